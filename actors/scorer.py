"""The 2D reward scorer actor (``scorer-<i>``): segment × aspect ratings for responses.

Backends (``scorer.backend``), one interface:

``hf`` (what runs and is tested here; the only backend that can train)
    The reward model through :func:`twodrl.models.loading.load_reward_model` (a token
    classification model read at each segment's last token, see
    :mod:`twodrl.models.reward_model`; with ``scorer.mode=sequence`` a sequence
    classification model read once, at the response's last token: one rating per
    aspect for the whole response, ``scores`` ``[1][A]``, as DPA's multi-objective RM
    rates), batched ``scorer.batch_size`` responses per
    forward, on CPU, one GPU, or — with ``tensor_parallel_size`` N > 1 — sharded layer
    by layer over N GPUs (``device_map="auto"``); the actor then asks Ray for N GPUs
    (:func:`actors.common.actor_request`), so they are visible to it.
``vllm`` (GPU clusters; not exercised by the CPU test suite)
    The same checkpoint in vLLM's pooling runner with ``tensor_parallel_size`` GPUs, so
    a 72B reward model fits across a node. The prompt is tokenized here with the same
    chat template, so the positions of segment-final tokens are known; vLLM returns the
    per-token head outputs, and the rows at those positions are the ratings.
``auto`` (the default) is ``vllm`` on GPU when the run never trains the reward model
and it is a segment (token-classification) one, else ``hf``
(:meth:`twodrl.config.ScorerConfig.resolved_backend`).

Round 0 trains the reward model on judge annotations (:meth:`RewardScorer.train`);
every scorer of the pool then loads the same weights (:meth:`RewardScorer.load`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import ray
import torch

from actors.common import actor_options, run_namespace, tensor_parallel_group, validate_placement, wait_placement_group
from twodrl.config import RunConfig, ScorerConfig


class RewardScorer:
    """One scorer. ``score`` takes ``[{"id", "prompt", "response", "history"?,
    "system"?, "segments"?}]`` and returns ``[{"id", "segments", "scores"}]`` with
    ``scores`` an ``[S][A]`` list of floats (0–4 scale, aspects in
    ``aspects.names`` order)."""

    def __init__(self, cfg: RunConfig, index: int = 0):
        from actors.common import count_incarnation, redirect_actor_output

        redirect_actor_output()  # RUN_DIR/logs/scorer-N.log
        self._incarnation = count_incarnation()
        torch.set_num_threads(int(os.environ.get("TWODRL_TORCH_THREADS", "1")))
        self.cfg = cfg
        self.index = index
        self.aspects = list(cfg.aspects.names)
        self.on_gpu = cfg.scorer.num_gpus > 0 and torch.cuda.is_available()
        self.backend = cfg.scorer.resolved_backend()
        self.device = torch.device("cuda") if self.on_gpu else torch.device("cpu")
        self.model_cfg = cfg.scorer.model
        self._vllm = None
        self.requests = 0
        # Ray restarts a dead scorer by running __init__ again with the original config,
        # which would bring back the untrained model. The weights this scorer last
        # trained or loaded are therefore recorded on its node, and a restart resumes
        # from them.
        self._state_dir = Path(tempfile.gettempdir()) / "twodrl-scorers" / _actor_key(index)
        current = self._state_dir / "current"
        if current.is_file() and Path(current.read_text().strip()).is_dir():
            self.model_cfg = replace(self.model_cfg, path=current.read_text().strip())
        self._load(self.model_cfg)

    def _load(self, model_cfg) -> None:
        from twodrl.models.loading import load_reward_model, load_tokenizer

        self.tokenizer = load_tokenizer(model_cfg)
        tp = self.cfg.scorer.tensor_parallel_size
        if self.backend == "vllm" and self.on_gpu:
            self.model = None
            self._vllm = _VllmTokenScorer(model_cfg, tp)
            labels = self._vllm.aspects
        else:
            from twodrl.models.reward_model import aspect_names

            # With N > 1 GPUs (Ray made N visible to this actor) the layers are spread
            # over them; a model too big for one GPU is what N > 1 is for.
            device_map = "auto" if self.on_gpu and tp > 1 else None
            self.model = load_reward_model(model_cfg, device=self.device, mode=self.cfg.scorer.mode,
                                           aspects=self.aspects, device_map=device_map)
            labels = aspect_names(self.model)
        if list(labels) != self.aspects:
            # A silent mismatch would feed, say, safety ratings in as correctness.
            raise ValueError(
                f"scorer.model.path {model_cfg.path!r} rates {list(labels)} but aspects.names is {self.aspects}"
            )

    def ready(self) -> int:
        return os.getpid()

    def incarnation(self) -> int:
        """1, plus one for every restart of this actor."""
        return self._incarnation

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score(self, items: list[dict]) -> list[dict]:
        """Ratings per segment. Segments come from the item (``segments``) or the
        segmenter. A segment cut off by ``scorer.model.max_length`` has no rating; such
        trailing segments are dropped from the answer, so ``segments`` and ``scores``
        always have the same length and hold no NaN."""
        from twodrl.segmentation import stripped_segments

        self.requests += len(items)
        out: list[dict] = []
        bs = max(1, self.cfg.scorer.batch_size)
        for start in range(0, len(items), bs):
            chunk = items[start : start + bs]
            segs = [list(it["segments"]) if it.get("segments") is not None else stripped_segments(it["response"]) for it in chunk]
            mats = self._score_batch(chunk, segs)
            for it, s, m in zip(chunk, segs, mats):
                m = m.float()
                if self.cfg.scorer.mode == "segment":
                    rated = ~torch.isnan(m).any(-1) if m.numel() else torch.zeros(0, dtype=torch.bool)
                    keep = int(rated.long().cumprod(0).sum()) if rated.numel() else 0
                    s, m = s[:keep], m[:keep]
                out.append({"id": it["id"], "segments": s, "scores": m.tolist()})
        return out

    def _score_batch(self, chunk: list[dict], segments: list[list[str]]) -> list[torch.Tensor]:
        prompts = [it["prompt"] for it in chunk]
        responses = [it["response"] for it in chunk]
        histories = [it.get("history") for it in chunk]
        systems = [it.get("system") for it in chunk]
        max_length = self.cfg.scorer.model.max_length
        if self._vllm is not None:
            return self._vllm.score(self.tokenizer, prompts, responses, segments, histories, systems, max_length)
        from twodrl.models import reward_model

        return reward_model.score(
            self.model, self.tokenizer, prompts, responses, histories=histories, batch_size=len(chunk),
            segments=segments, systems=systems, max_length=max_length, clamp=True,
        )

    # ------------------------------------------------------------------ training

    def train(self, records: list[dict], cfg: Optional[ScorerConfig] = None, epochs: Optional[int] = None,
              lr: Optional[float] = None) -> dict[str, Any]:
        """Fit the reward model on HelpSteer-2D records (judge annotations) with the
        ``scorer.train_*`` settings (or ``cfg``; ``epochs`` / ``lr`` override its
        epochs / learning rate: the online updates fine-tune gently); returns the
        training metrics (``rm/mse`` …). The trained weights survive a restart of this
        actor."""
        from twodrl.models import reward_model

        if self.model is None:
            raise RuntimeError("scorer.backend=vllm serves a fixed model; train with backend=hf")
        sc = cfg or self.cfg.scorer
        if epochs is not None:
            sc = replace(sc, train_epochs=epochs)
        if lr is not None:
            sc = replace(sc, train_lr=lr)
        try:
            metrics = reward_model.train_reward_model(
                self.model, self.tokenizer, records, sc, progress=False, seed=self.cfg.seed
            )
        finally:
            self.model.eval()
        self._remember(self.save(str(self._state_dir / "weights")))
        return dict(metrics or {})

    def _remember(self, path: str) -> None:
        self._state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_dir / "current.tmp"
        tmp.write_text(str(path))
        os.replace(tmp, self._state_dir / "current")

    def save(self, directory: str) -> str:
        from twodrl.models.loading import save_pretrained_safe

        if self.model is None:
            raise RuntimeError("scorer.backend=vllm has no trainable copy to save")
        save_pretrained_safe(self.model, self.tokenizer, directory)
        return directory

    def load(self, directory: str) -> None:
        """Reload weights from a saved directory (another scorer's :meth:`save`)."""
        self.model_cfg = replace(self.model_cfg, path=str(directory))
        self._load(self.model_cfg)
        self._remember(str(directory))

    def stats(self) -> dict[str, int]:
        return {"requests": self.requests, "pid": os.getpid()}


def _actor_key(index: int) -> str:
    """Stable across restarts of this actor, different for every new actor (a new run
    must never pick up an old run's weights)."""
    try:
        actor_id = ray.get_runtime_context().get_actor_id()
    except Exception:  # noqa: BLE001 - outside Ray (unit use)
        actor_id = None
    return actor_id or f"local-{os.getpid()}-{index}"


class _VllmTokenScorer:
    """vLLM pooling runner for a token-classification reward model (GPU only).

    Not exercised by the CPU test suite (it needs a GPU build of vLLM). Kept minimal:
    the token ids and segment-final positions come from the same encoding as the HF
    path (:func:`twodrl.models.logprobs.encode_pairs`,
    :func:`twodrl.models.reward_model.segment_end_positions`), the ids go to vLLM as
    ``TokensPrompt``, and the per-token head outputs are read at those positions."""

    def __init__(self, model_cfg, tensor_parallel_size: int):
        from transformers import AutoConfig
        from vllm import LLM

        from twodrl.models.loading import resolve_model_path

        path = resolve_model_path(model_cfg.path)
        hf_cfg = AutoConfig.from_pretrained(path, trust_remote_code=bool(model_cfg.trust_remote_code))
        self.aspects = [hf_cfg.id2label[i] for i in range(hf_cfg.num_labels)]
        self.llm = LLM(
            model=path,
            runner="pooling",
            tensor_parallel_size=tensor_parallel_size,
            dtype=model_cfg.dtype,
            trust_remote_code=bool(model_cfg.trust_remote_code),
        )

    def score(self, tokenizer, prompts, responses, segments, histories, systems, max_length) -> list[torch.Tensor]:
        from vllm.inputs import TokensPrompt

        from twodrl.models.logprobs import encode_pairs
        from twodrl.models.reward_model import segment_end_positions

        enc = encode_pairs(tokenizer, prompts, responses, histories, systems, max_length=max_length, segments=segments)
        _, cols, valid = segment_end_positions(enc)
        lengths = enc.attention_mask.sum(1).tolist()
        token_prompts = [TokensPrompt(prompt_token_ids=enc.input_ids[i, :n].tolist()) for i, n in enumerate(lengths)]
        outs = self.llm.encode(token_prompts, pooling_task="token_classify", use_tqdm=False)
        mats = []
        for i, o in enumerate(outs):
            per_token = torch.as_tensor(o.outputs.data).float()  # [T_i, A]
            k = int(enc.num_segments[i])
            m = per_token[cols[i, :k]].clamp(0.0, 4.0)
            mats.append(m.masked_fill(~valid[i, :k, None], float("nan")))
        return mats


def create_scorers(cfg: RunConfig, namespace: Optional[str] = None, validate: bool = True) -> list:
    """``scorer.num_workers`` actors ``scorer-<i>`` with resources and restarts from the
    config; waits until each has loaded its model."""
    from actors.common import get_or_create_actor, role_resources

    namespace = namespace or run_namespace(cfg)
    if validate:
        validate_placement(cfg, roles=("scorer",))
    res = role_resources(cfg, "scorer")
    cls = ray.remote(RewardScorer)
    handles = []
    for i in range(cfg.scorer.num_workers):
        # A vLLM TP engine gets its group; an HF scorer asks for its GPUs directly
        # (actors.common.actor_request decides, and twodrl plan reads the same).
        pg = tensor_parallel_group(res, name=f"{namespace}-scorer-{i}")
        wait_placement_group(pg, field_hint="scorer.tensor_parallel_size / scorer.num_gpus")
        opts = actor_options("scorer", i, cfg, namespace=namespace, placement=pg, bundle_index=0 if pg else -1)
        handles.append(get_or_create_actor(cls, opts, cfg, i))
    ray.get([h.ready.remote() for h in handles])
    return handles
