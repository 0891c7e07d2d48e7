"""Rollout workers: sample responses from the current policy, with per-token log-probs.

One Ray actor per inference engine (``rollout-<i>`` in the run's namespace). Two
backends sit behind :class:`RolloutBackend`:

- ``vllm`` (default): a vLLM engine in this actor's process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; with tensor parallelism on GPU its extra ranks
  are Ray workers inside the actor's placement group). Weight updates go through
  :class:`VLLMWeightSyncExtension`, a worker extension that runs *inside* each engine
  rank. Where the engine's parameters are the live weights its kernels read (GPU,
  unquantized; CPU with ``rollout.cpu_prepack_weights: false``) every bucket is loaded
  the moment it arrives with the model's own ``load_weights``: one copy per tensor into
  the existing storage. Where the kernels keep repacked copies (vLLM's CPU oneDNN path
  drops the plain weights; quantized models) a plain copy would not reach them, so the
  buckets are held until the update is finished and loaded in one ``reload_weights``
  session, vLLM's own path for that case, which re-runs the per-layer packing.
- ``hf``: ``transformers`` ``generate`` — slow, for debugging and as a fallback.

Requests are ``{"id", "prompt", "history"?, "system"?}``; DPA's preference-conditioned
instruction goes in ``system``. Prompts are rendered with the model's chat template by
:func:`twodrl.models.logprobs.render_prompt`, the same rendering the learner uses, so the
token ids a sample was drawn from are the ids the learner scores.

Generation and weight updates never interleave on one engine. The actor runs three
Ray concurrency groups: the default one (``generate``, ``sequence_logprobs``: one call
at a time), ``weights`` (bucket loads, finish, broadcast receive: one at a time, in
the order sent) and ``control`` (cheap status calls that never touch the engine, so a
long generation cannot hold them up). An :class:`EngineGate` orders the first two: the
first bucket of an update closes the gate to new engine work and then waits for the
work already running to end; engine work that asks while an update is open waits until
it is finished. So a ``generate`` either ran wholly on the old weights (and ended
before the first bucket was loaded) or wholly on the new ones, and the
``weights_version`` it reports is the one it ran with, read under the same lock.

Log-probs are *raw*: the model's distribution before temperature / top-p (vLLM's
default ``raw_logprobs`` mode), i.e. what the learner's forward pass computes.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Protocol, Sequence

import ray
import torch

from actors.common import actor_options, run_namespace, tensor_parallel_group, wait_placement_group
from actors.weight_sync import (
    BufferPool,
    WeightGroup,
    consume_buckets,
    iter_broadcast_buckets,
    open_bucket,
)
from twodrl.config import RunConfig
from twodrl.weights import TensorMeta, iter_unpacked, unpack_bucket

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers


@torch.no_grad()
def hf_sequence_logprobs(
    model: torch.nn.Module,
    prompt_token_ids: Sequence[Sequence[int]],
    response_token_ids: Sequence[Sequence[int]],
    batch_size: int = 16,
) -> list[list[float]]:
    """Per-token log-probs of each response given its prompt, from one padded forward
    pass per batch: ``log p(r_t | prompt, r_<t)`` for every response token. Works on
    token ids as given (no re-tokenisation), which is what parity checks need."""
    from twodrl.models.logprobs import token_logprobs_from_logits

    if len(prompt_token_ids) != len(response_token_ids):
        raise ValueError(
            f"sequence_logprobs: {len(prompt_token_ids)} prompts but {len(response_token_ids)} responses"
        )
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for start in range(0, len(prompt_token_ids), batch_size):
        prompts = prompt_token_ids[start : start + batch_size]
        responses = response_token_ids[start : start + batch_size]
        seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        lengths = torch.tensor([len(s) for s in seqs])
        width = int(lengths.max())
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        # Logits at position t predict token t+1 (same helper as the learner's).
        lp = token_logprobs_from_logits(logits[:, :-1], ids[:, 1:].to(device)).cpu()
        for i, (p, r) in enumerate(zip(prompts, responses)):
            out.append(lp[i, len(p) - 1 : len(p) - 1 + len(r)].tolist())
    return out


def _validate_requests(requests: Sequence[dict]) -> None:
    for i, req in enumerate(requests):
        if not isinstance(req, dict) or "id" not in req or "prompt" not in req:
            raise ValueError(f"rollout request {i}: expected a dict with 'id' and 'prompt', got {req!r:.200}")


# --------------------------------------------------------------------------- backend protocol


class RolloutBackend(Protocol):
    """What a rollout engine must do. Token ids in, token ids out: rendering and
    detokenisation happen once, in :class:`RolloutWorker`."""

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: Optional[int],
    ) -> list[list[dict]]:
        """Per prompt, ``n`` samples ``{"token_ids", "logprobs", "finish_reason"}``."""

    def sequence_logprobs(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]]) -> list[list[float]]: ...

    def load_bucket(self, descriptor: dict) -> int:
        """Load one bucket (a descriptor from ``actors.weight_sync.stream_buckets``) in
        place, or hold it until :meth:`finish_update`; returns its tensor count."""

    def finish_update(self) -> None:
        """Complete the update: load anything held, drop caches of the old weights."""

    def abort_update(self) -> None:
        """Give the update up: drop anything held (the live weights keep whatever
        buckets were already loaded in place)."""

    def weight_load_mode(self) -> str:
        """``in_place`` (each bucket copied into the live parameters on arrival; with
        ``/replay`` once the loader's copies are recorded) or ``reload`` (held, then one
        re-packing reload at finish)."""

    def weight_group_ranks(self) -> int:
        """How many ranks this engine contributes to a weight group (its TP size)."""

    def init_weight_group(self, host: str, port: int, world_size: int, rank_base: int, backend: str,
                          timeout_s: float, token: str) -> None: ...

    def receive_broadcast(self) -> int:
        """Receive one broadcast of all buckets and load them; returns tensors loaded."""


# --------------------------------------------------------------------------- vLLM


class VLLMWeightSyncExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``): ``self`` is the worker,
    so these methods run next to the model on each engine rank — in-process on CPU,
    in each TP worker on GPU. Called through ``LLM.collective_rpc``."""

    def twodrl_load_bucket(self, descriptor: dict) -> int:
        bucket = open_bucket(descriptor)
        if self._twodrl_in_place():
            self._twodrl_load(unpack_bucket(bucket))
        else:
            # A fused layer (q, k and v in one qkv_proj) is re-packed once all of its
            # weights are in, and a bucket may end half-way through one: keep the
            # views (the sender leaves them untouched until the next sync) and reload
            # everything in one session at finish.
            self.__dict__.setdefault("_twodrl_held", []).append(bucket)
        return len(bucket.metas)

    def twodrl_weight_load_mode(self) -> str:
        """``reload``, ``in_place`` (vLLM's loader on every sync) or ``in_place/replay``
        (its recorded copies, once a sync has recorded them)."""
        if not self._twodrl_in_place():
            return "reload"
        plan = self.__dict__.get("_twodrl_plan")
        replaying = plan is not None and plan.copies and not self.__dict__.get("_twodrl_plan_off")
        return "in_place/replay" if replaying else "in_place"

    def twodrl_finish_update(self) -> None:
        held = self.__dict__.pop("_twodrl_held", [])
        if held:
            self._twodrl_load(iter_unpacked(held))

    def twodrl_abort_update(self) -> None:
        # Held buckets of an update that will not complete: loading them would mix
        # versions, so they are dropped and the engine keeps its previous weights.
        self.__dict__.pop("_twodrl_held", None)

    def twodrl_init_weight_group(self, host: str, port: int, world_size: int, rank_base: int, backend: str,
                                 timeout_s: float, token: str) -> None:
        device = getattr(self, "device", None) if backend == "nccl" else None
        self._twodrl_group = WeightGroup.join(
            host, port, rank_base + int(getattr(self, "rank", 0)), world_size, backend, timeout_s,
            device=device, token=token,
        )

    def twodrl_receive_broadcast(self) -> int:
        group = getattr(self, "_twodrl_group", None)
        if group is None:
            raise RuntimeError("rollout engine has no weight group; the driver must call init_weight_group first")
        pool = getattr(self, "_twodrl_pool", None)
        if pool is None:
            pool = self._twodrl_pool = BufferPool()
        return consume_buckets(iter_broadcast_buckets(group, pool), self._twodrl_load)

    def _twodrl_in_place(self) -> bool:
        """Whether the model's parameters are what its kernels read: unquantized, and
        no layer has swapped its weight for a repacked copy (vLLM's CPU oneDNN path
        leaves an empty placeholder behind)."""
        flag = self.__dict__.get("_twodrl_in_place_flag")
        if flag is None:
            quantized = getattr(self.vllm_config, "quant_config", None) is not None
            flag = not quantized and all(p.numel() > 0 for p in self.get_model().parameters())
            self._twodrl_in_place_flag = flag
        return flag

    def _twodrl_load(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        if not self._twodrl_in_place():
            self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
            return
        from vllm.config import set_current_vllm_config

        from twodrl.copy_plan import CopyPlan, NotReplayable, record_copies

        plan = self.__dict__.setdefault("_twodrl_plan", CopyPlan())
        named = []  # views into the received buffers, for the loader: no copy yet
        for item in weights:
            if plan.covers([item]):
                # Every later sync: the recorded copies only (twodrl.copy_plan), as
                # the tensors arrive.
                plan.replay([item])
            else:
                named.append(item)
        if not named:
            return
        model = self.get_model()
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            if self.__dict__.get("_twodrl_plan_off"):
                model.load_weights(named)
                return
            try:
                # First sync of these names: vLLM's loader runs (and really loads)
                # while its copies are recorded and checked.
                state = [*model.parameters(), *model.buffers()]  # everything a loader may write
                plan.add(record_copies(model.load_weights, named, state), named)
            except NotReplayable as e:
                self._twodrl_plan_off = str(e)
                logger.warning("rollout: weight syncs keep using vLLM's load_weights (%s)", e)


def _plain_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def keep_plain_cpu_linear_weights() -> bool:
    """Make vLLM's CPU build compute dense linear layers with ``torch.nn.functional.linear``
    on the layer's own weight, instead of repacking the weight for oneDNN and dropping
    the original. The parameters then stay the weights the kernels read, so a weight
    sync is one in-place copy per tensor (the GPU path) instead of a full reload that
    repacks every layer. Affects engines created afterwards in this process (a rollout
    actor hosts one). Returns False, changing nothing, on a vLLM without that hook;
    the sync then falls back to reloading (see VLLMWeightSyncExtension)."""
    try:
        from vllm.model_executor.layers import utils as layer_utils
    except ImportError:
        return False
    original = getattr(layer_utils, "dispatch_cpu_unquantized_gemm", None)
    if original is None:
        return False
    if getattr(original, "_twodrl_plain", False):
        return True

    def dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        weight = getattr(layer, "weight", None)
        if weight is None or weight.is_meta or weight.dim() != 2:
            return original(layer, remove_weight)  # not a dense linear: vLLM's own choice
        layer.cpu_linear = _plain_linear

    dispatch._twodrl_plain = True  # type: ignore[attr-defined]
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch
    return True


class VLLMBackend:
    def __init__(self, model_path: str, cfg: RunConfig, seed: int):
        # In-process engine: tensors handed to collective_rpc reach the worker as they
        # are (no serialisation), and an actor can host it (no fork of a Ray worker).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        on_cpu = cfg.rollout.num_gpus <= 0
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
            if not cfg.rollout.cpu_prepack_weights:
                keep_plain_cpu_linear_weights()
        from vllm import LLM

        r = cfg.rollout
        kwargs: dict[str, Any] = dict(
            model=model_path,
            tokenizer=model_path,
            dtype=cfg.policy.dtype,
            seed=seed,
            max_model_len=cfg.policy.max_length,
            trust_remote_code=cfg.policy.trust_remote_code,
            tensor_parallel_size=r.tensor_parallel_size,
            worker_extension_cls=f"{VLLMWeightSyncExtension.__module__}.{VLLMWeightSyncExtension.__qualname__}",
            # Kernel compilation and CUDA graphs pay off on GPU; on CPU they only add
            # start-up minutes.
            enforce_eager=on_cpu,
        )
        if not on_cpu:
            kwargs["gpu_memory_utilization"] = r.gpu_memory_utilization
            if r.tensor_parallel_size > 1:
                kwargs["distributed_executor_backend"] = "ray"
        self.llm = LLM(**kwargs)
        self.tp = r.tensor_parallel_size

    def generate(self, prompt_token_ids, n, temperature, top_p, max_new_tokens, seed):
        from vllm import SamplingParams

        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p if temperature > 0 else 1.0,
            max_tokens=max_new_tokens,
            logprobs=0,  # the sampled token's own log-prob only
            seed=seed,
            detokenize=False,  # the worker decodes once, the same way for every backend
        )
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_token_ids], params, use_tqdm=False)
        results = []
        for out in outs:
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [float(d[t].logprob) for t, d in zip(ids, c.logprobs)]
                samples.append({"token_ids": ids, "logprobs": lps, "finish_reason": c.finish_reason or "length"})
            results.append(samples)
        return results

    def sequence_logprobs(self, prompt_token_ids, response_token_ids):
        from vllm import SamplingParams

        # Score the whole sequence as a prompt; prompt_logprobs=0 returns the log-prob
        # of each actual token. Generate a single greedy token and ignore it.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        seqs = [{"prompt_token_ids": list(p) + list(r)} for p, r in zip(prompt_token_ids, response_token_ids)]
        outs = self.llm.generate(seqs, params, use_tqdm=False)
        result = []
        for out, p, r in zip(outs, prompt_token_ids, response_token_ids):
            full = list(p) + list(r)
            lps = out.prompt_logprobs
            result.append([float(lps[i][full[i]].logprob) for i in range(len(p), len(full))])
        return result

    def _after_update(self) -> None:
        # Cached prefix KV blocks were computed with the old weights.
        self.llm.reset_prefix_cache()

    def load_bucket(self, descriptor):
        return int(self.llm.collective_rpc("twodrl_load_bucket", args=(descriptor,))[0])

    def finish_update(self):
        self.llm.collective_rpc("twodrl_finish_update")
        self._after_update()

    def abort_update(self):
        self.llm.collective_rpc("twodrl_abort_update")
        self._after_update()

    def weight_load_mode(self) -> str:
        return str(self.llm.collective_rpc("twodrl_weight_load_mode")[0])

    def weight_group_ranks(self) -> int:
        return self.tp

    def init_weight_group(self, host, port, world_size, rank_base, backend, timeout_s, token):
        self.llm.collective_rpc(
            "twodrl_init_weight_group", args=(host, port, world_size, rank_base, backend, timeout_s, token)
        )

    def receive_broadcast(self):
        counts = self.llm.collective_rpc("twodrl_receive_broadcast")
        self._after_update()
        return int(counts[0])


# --------------------------------------------------------------------------- Hugging Face


class HFBackend:
    """``transformers`` generation. Log-probs come from a forward pass over the sampled
    sequences, so they are raw log-probs exactly like the vLLM backend's."""

    def __init__(self, model_path: str, cfg: RunConfig, seed: int):
        from twodrl.models.loading import load_causal_lm, load_tokenizer

        mc = dataclasses.replace(cfg.policy, path=model_path)
        self.device = "cuda" if cfg.rollout.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(mc, device=self.device)
        self.tokenizer = load_tokenizer(mc)
        self.params = dict(self.model.named_parameters())
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen is not None else None
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or [])) | {self.tokenizer.eos_token_id}
        self.pad_id = self.tokenizer.pad_token_id
        self.seed = seed
        torch.manual_seed(seed)  # unseeded requests still differ across workers, repeat per run
        self.group: Optional[WeightGroup] = None
        self.pool = BufferPool()

    def generate(self, prompt_token_ids, n, temperature, top_p, max_new_tokens, seed):
        if seed is None:
            return self._generate_batch(prompt_token_ids, n, temperature, top_p, max_new_tokens)
        # A seed makes each request's samples reproducible on their own, whatever else
        # is in the batch (as in vLLM, where the seed is per request): one prompt at a
        # time, each from a freshly seeded generator.
        out = []
        for ids in prompt_token_ids:
            torch.manual_seed(seed)
            out += self._generate_batch([ids], n, temperature, top_p, max_new_tokens)
        return out

    @torch.no_grad()
    def _generate_batch(self, prompt_token_ids, n, temperature, top_p, max_new_tokens):
        width = max(len(p) for p in prompt_token_ids)
        # Left padding: every prompt ends at the same column, so new tokens line up.
        ids = torch.full((len(prompt_token_ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_token_ids):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        greedy = temperature <= 0
        gen = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_p=None if greedy else top_p,
            top_k=None,
            num_return_sequences=n,
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
        )[:, width:].cpu()
        samples: list[list[int]] = []
        finish: list[str] = []
        for row in gen.tolist():
            cut = next((k + 1 for k, t in enumerate(row) if t in self.eos_ids), None)
            samples.append(row[:cut] if cut else row)
            finish.append("stop" if cut else "length")
        prompts = [p for p in prompt_token_ids for _ in range(n)]
        logprobs = hf_sequence_logprobs(self.model, prompts, samples)
        out = []
        for i in range(len(prompt_token_ids)):
            out.append([
                {"token_ids": samples[k], "logprobs": logprobs[k], "finish_reason": finish[k]}
                for k in range(i * n, (i + 1) * n)
            ])
        return out

    def sequence_logprobs(self, prompt_token_ids, response_token_ids):
        return hf_sequence_logprobs(self.model, prompt_token_ids, response_token_ids)

    @torch.no_grad()
    def _load(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            param = self.params.get(name)
            if param is None:
                raise KeyError(f"rollout (hf backend): received weight {name!r} that the model does not have")
            param.copy_(tensor)

    def load_bucket(self, descriptor):
        bucket = open_bucket(descriptor)
        self._load(unpack_bucket(bucket))
        return len(bucket.metas)

    def finish_update(self):
        pass

    def abort_update(self):
        pass

    def weight_load_mode(self) -> str:
        return "in_place"

    def weight_group_ranks(self) -> int:
        return 1

    def init_weight_group(self, host, port, world_size, rank_base, backend, timeout_s, token):
        device = torch.device(self.device) if backend == "nccl" else None
        self.group = WeightGroup.join(host, port, rank_base, world_size, backend, timeout_s, device=device, token=token)

    def receive_broadcast(self):
        if self.group is None:
            raise RuntimeError("rollout (hf backend) has no weight group; the driver must call init_weight_group first")
        return consume_buckets(iter_broadcast_buckets(self.group, self.pool), self._load)


# --------------------------------------------------------------------------- engine gate


class PartialWeightsError(RuntimeError):
    """The engine holds part of an update that never completed: sampling from it would
    mix two policies, so engine work is refused until a complete sync."""


class EngineGate:
    """Mutual exclusion of engine work (generation, scoring) and weight updates, with
    the weights version kept under the same lock.

    Engine work may run while no update is open, and reads the version it runs with
    when it enters. An update opens at its first bucket: from then on new engine work
    waits, and the update itself waits until the work already running has ended. It
    closes at finish (new version) or abort. Updates win over waiting work, so a sync
    is never starved by a steady stream of generate calls.

    The two sides run on different threads of the actor (see the module docstring);
    within one side, calls come one at a time. Waits have no timeout here: the callers'
    deadlines (the work queue for generation, the weight sync for buckets) end a hung
    partner by restarting the actor.
    """

    def __init__(self, version: int = 0):
        self._cond = threading.Condition()
        self._users = 0
        self._updating = False
        self._version = int(version)
        self._partial: Optional[str] = None

    @property
    def version(self) -> int:
        with self._cond:
            return self._version

    @property
    def updating(self) -> bool:
        with self._cond:
            return self._updating

    def state(self) -> dict:
        with self._cond:
            return {"version": self._version, "updating": self._updating, "engine_calls": self._users,
                    "partial": self._partial is not None}

    @contextmanager
    def use(self) -> Iterator[int]:
        """Engine work inside the block; yields the weights version it runs with."""
        with self._cond:
            self._cond.wait_for(lambda: not self._updating)
            if self._partial is not None:
                raise PartialWeightsError(self._partial)
            self._users += 1
            version = self._version
        try:
            yield version
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    def begin_update(self) -> bool:
        """Open an update (a no-op when one is open already) and wait until no engine
        work is running. True when this call opened it."""
        with self._cond:
            opened = not self._updating
            self._updating = True
            self._cond.wait_for(lambda: self._users == 0)
            return opened

    def end_update(self, version: Optional[int] = None, partial: Optional[str] = None) -> int:
        """Close the update. ``version``: the new weights are complete (``None`` keeps
        the old number: e.g. a group join, which changes no weight). ``partial``: the
        update failed after changing live weights; engine work is refused until a
        later update completes."""
        with self._cond:
            if partial is not None:
                self._partial = partial
            elif version is not None:
                self._version = int(version)
                self._partial = None
            self._updating = False
            self._cond.notify_all()
            return self._version


# --------------------------------------------------------------------------- actor


def _new_update() -> dict:
    return {"load_s": 0.0, "tensors": 0, "buckets": 0, "bytes": 0}


# Ray concurrency groups of RolloutWorker (the default group, one call at a time, is
# generation). One thread each: bucket loads stay in the order they were sent.
WEIGHTS_GROUP = "weights"
CONTROL_GROUP = "control"


@ray.remote(concurrency_groups={WEIGHTS_GROUP: 1, CONTROL_GROUP: 1})
class RolloutWorker:
    """One rollout engine. See the module docstring for the request/result format and
    for how generation and weight updates are kept apart."""

    def __init__(self, cfg: RunConfig, index: int = 0, backend: Optional[str] = None, model_path: Optional[str] = None):
        from actors.common import count_incarnation, redirect_actor_output
        from twodrl.models.loading import load_tokenizer, resolve_model_path

        redirect_actor_output()  # vLLM's start-up logs go to RUN_DIR/logs/rollout-N.log
        self._incarnation = count_incarnation()
        self.cfg = cfg
        self.index = index
        self.backend_name = backend or cfg.rollout.backend
        if cfg.rollout.num_gpus <= 0:
            # Ray gives an actor a fractional CPU slot; without a cap torch would start
            # one thread per core in every actor and they would all fight.
            torch.set_num_threads(max(1, int(os.environ.get("TWODRL_ROLLOUT_THREADS", "1"))))
        path = resolve_model_path(model_path or cfg.policy.path)
        self.model_path = path
        self.tokenizer = load_tokenizer(dataclasses.replace(cfg.policy, path=path))
        seed = cfg.seed + 1000 * index
        if self.backend_name == "vllm":
            self.backend: RolloutBackend = VLLMBackend(path, cfg, seed)
        elif self.backend_name == "hf":
            self.backend = HFBackend(path, cfg, seed)
        else:
            raise ValueError(f"rollout.backend: {self.backend_name!r} is not one of ['vllm', 'hf']")
        self._gate = EngineGate()
        self._group_token = ""
        self._update = _new_update()
        # Recent engine calls and weight loads with monotonic start/end times: what
        # ran on which weights, for diagnosing a run (and for the ordering tests).
        self._timeline: collections.deque = collections.deque(maxlen=512)

    def _record(self, event: str, start: float, version: int, **extra: Any) -> None:
        self._timeline.append({"event": event, "start": start, "end": time.monotonic(), "version": version, **extra})

    # -- status (never touches the engine) --------------------------------------------

    @ray.method(concurrency_group=CONTROL_GROUP)
    def ready(self) -> int:
        """The process id: it changes when Ray restarts the worker (the driver counts
        restarts by it)."""
        return os.getpid()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def incarnation(self) -> int:
        """1, plus one for every restart of this actor."""
        return self._incarnation

    @ray.method(concurrency_group=CONTROL_GROUP)
    def weights_version(self) -> int:
        return self._gate.version

    @ray.method(concurrency_group=CONTROL_GROUP)
    def deadlines(self) -> dict:
        """Seconds a caller should allow per call before taking this worker for hung
        (``rollout.call_timeout_s`` / ``sync_timeout_s``): the work queue and the weight
        sync ask, so the driver need not pass them."""
        r = self.cfg.rollout
        return {"generate": r.call_timeout_s, "sequence_logprobs": r.call_timeout_s, "sync": r.sync_timeout_s}

    @ray.method(concurrency_group=CONTROL_GROUP)
    def engine_state(self) -> dict:
        """``version``, ``updating`` (a weight update is open), ``engine_calls`` (running
        generate / scoring calls) and ``partial`` (a failed update left mixed weights)."""
        return self._gate.state()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def timeline(self) -> list[dict]:
        """The most recent engine calls and weight loads (``event``, monotonic ``start``
        / ``end`` in this process, the weights ``version`` it ran with / installed)."""
        return list(self._timeline)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def weight_group_ranks(self) -> int:
        return self.backend.weight_group_ranks()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def weight_group_token(self) -> str:
        """The id of the weight group this worker is in ("" if none: e.g. restarted)."""
        return self._group_token

    # -- generation ------------------------------------------------------------------

    def info(self) -> dict:
        with self._gate.use() as version:
            mode = self.backend.weight_load_mode()
        return {"index": self.index, "backend": self.backend_name, "model_path": self.model_path,
                "weights_version": version, "weight_load": mode}

    def render(self, request: dict) -> list[int]:
        """Token ids of a request's prompt, rendered with the chat template."""
        from twodrl.models.logprobs import render_prompt

        text = render_prompt(self.tokenizer, request["prompt"], history=request.get("history"),
                             system=request.get("system"))
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(
        self,
        requests: list[dict],
        n: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        max_new_tokens: Optional[int] = None,
        seed: Optional[int] = None,
        greedy: bool = False,
    ) -> list[dict]:
        """Sample ``n`` responses per request. Unset sampling arguments come from
        ``rollout`` in the config (paper defaults: temperature 0.7, top_p 0.8, 4
        samples). ``greedy`` overrides temperature (0) and top_p (1). Waits while a
        weight update is open; every result's ``weights_version`` is the version its
        samples were drawn with."""
        _validate_requests(requests)
        r = self.cfg.rollout
        n = r.samples_per_prompt if n is None else int(n)
        temperature = 0.0 if greedy else (r.temperature if temperature is None else float(temperature))
        top_p = 1.0 if greedy else (r.top_p if top_p is None else float(top_p))
        max_new_tokens = r.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"rollout.generate: n and max_new_tokens must be ≥ 1, got {n}, {max_new_tokens}")
        prompt_ids = [self.render(req) for req in requests]
        too_long = [req["id"] for req, ids in zip(requests, prompt_ids)
                    if len(ids) + max_new_tokens > self.cfg.policy.max_length]
        if too_long:
            raise ValueError(
                f"rollout.generate: prompt + max_new_tokens exceeds policy.max_length "
                f"({self.cfg.policy.max_length}) for request id(s) {too_long[:5]}"
            )
        if not requests:
            return []
        asked = time.monotonic()
        with self._gate.use() as version:
            start = time.monotonic()
            samples = self.backend.generate(prompt_ids, n, temperature, top_p, max_new_tokens, seed)
            self._record("generate", start, version, asked=asked, ids=[req["id"] for req in requests])
        out = []
        for req, ids, per_prompt in zip(requests, prompt_ids, samples):
            for s in per_prompt:
                s["text"] = self.tokenizer.decode(s["token_ids"], skip_special_tokens=True)
            out.append({"id": req["id"], "prompt_token_ids": ids, "weights_version": version,
                        "samples": per_prompt})
        return out

    def sequence_logprobs(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]]) -> list[list[float]]:
        """Per-token log-probs of given responses under the current weights."""
        if len(prompt_token_ids) != len(response_token_ids):
            raise ValueError(
                f"sequence_logprobs: {len(prompt_token_ids)} prompts but {len(response_token_ids)} responses"
            )
        if any(len(p) == 0 or len(r) == 0 for p, r in zip(prompt_token_ids, response_token_ids)):
            raise ValueError("sequence_logprobs: every prompt and response needs at least one token")
        with self._gate.use():
            return self.backend.sequence_logprobs(prompt_token_ids, response_token_ids)

    # -- weights -----------------------------------------------------------------------

    def _next_version(self, version: Optional[int]) -> int:
        return self._gate.version + 1 if version is None else int(version)

    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def load_weight_bucket(self, descriptor: dict) -> int:
        """One bucket of a streamed update (``actors.weight_sync.sync_weights`` sends
        them in order, then :meth:`finish_weight_update`). The first bucket opens the
        update: it waits for running generation to end, and generation asked for
        from then on waits for the finish."""
        self._gate.begin_update()
        t = time.perf_counter()
        start = time.monotonic()
        try:
            count = self.backend.load_bucket(descriptor)
        except BaseException:
            self._update["failed"] = True  # finish must not claim the new version
            raise
        u = self._update
        # In place: the live weights changed (an abandoned update leaves a mix).
        if not u.get("applied"):
            u["applied"] = self.backend.weight_load_mode() != "reload"
        u["load_s"] += time.perf_counter() - t
        u["tensors"] += count
        u["buckets"] += 1
        u["bytes"] += sum(TensorMeta.from_json(m).nbytes for m in descriptor["metas"])
        self._record("bucket", start, self._gate.version, index=u["buckets"] - 1)
        return count

    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def finish_weight_update(self, version: Optional[int] = None) -> dict:
        """Close the update begun by :meth:`load_weight_bucket` calls; returns its
        totals (``load_s``, ``tensors``, ``buckets``, ``bytes``) and the new version."""
        self._gate.begin_update()  # an update of no buckets still closes cleanly
        t = time.perf_counter()
        start = time.monotonic()
        done, self._update = self._update, _new_update()
        applied = done.pop("applied", False)
        if done.pop("failed", False):
            self._give_up(applied, "a bucket of this weight update failed to load")
            raise RuntimeError(
                f"rollout-{self.index}: a bucket of this weight update failed to load; the engine keeps "
                f"weights version {self._gate.version}" + (" but refuses to generate until the next complete "
                                                            "sync (some weights were overwritten)" if applied else "")
            )
        try:
            self.backend.finish_update()
        except BaseException:
            self._give_up(True, "finishing the weight update failed")
            raise
        done["load_s"] += time.perf_counter() - t
        done["version"] = self._gate.end_update(self._next_version(version))
        self._record("finish", start, done["version"])
        return done

    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def abort_weight_update(self, reason: str = "the weight sync was abandoned") -> dict:
        """Close an update that will not be finished (the sender failed mid-way), so
        that generation waiting on it goes on. Buckets held for a reload are dropped;
        where some were already loaded in place the engine refuses engine work until
        a complete sync."""
        if not self._gate.updating:
            return {"aborted": False, "version": self._gate.version}
        done, self._update = self._update, _new_update()
        self._give_up(done.get("applied", False), reason)
        return {"aborted": True, "version": self._gate.version}

    def _give_up(self, applied: bool, reason: str) -> None:
        try:
            self.backend.abort_update()
        finally:
            partial = None
            if applied:
                partial = (f"rollout-{self.index}: {reason} after loading part of it in place; the engine "
                           f"refuses to sample until a complete weight sync")
            self._gate.end_update(None, partial=partial)
            self._record("abort", time.monotonic(), self._gate.version, reason=reason)

    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def init_weight_group(self, host: str, port: int, world_size: int, rank_base: int, backend: str = "gloo",
                          timeout_s: float = 600.0, token: str = "") -> None:
        """Join the learner's weight-broadcast group as ranks ``rank_base ..``."""
        # The engine is driven from this thread here: keep generation out meanwhile.
        self._gate.begin_update()
        try:
            self.backend.init_weight_group(host, port, world_size, rank_base, backend, timeout_s, token)
            self._group_token = token
        finally:
            self._gate.end_update(None)

    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def receive_weights_broadcast(self, version: Optional[int] = None) -> dict:
        self._gate.begin_update()
        t = time.perf_counter()
        start = time.monotonic()
        try:
            count = self.backend.receive_broadcast()
        except BaseException:
            # Broadcast buckets are loaded as they arrive: assume some were.
            self._give_up(True, "the weight broadcast failed")
            raise
        new = self._gate.end_update(self._next_version(version))
        self._record("broadcast", start, new)
        return {"load_s": time.perf_counter() - t, "tensors": count, "version": new}


def create_rollout_workers(cfg: RunConfig, namespace: Optional[str] = None,
                           backend: Optional[str] = None) -> list:
    """Start ``rollout.num_workers`` workers named ``rollout-<i>`` in ``namespace``
    (default: the run's), with resources and ``max_restarts`` from the config. Waits
    until every engine is up, so start-up failures surface here."""
    namespace = namespace or run_namespace(cfg)
    handles = []
    for i in range(cfg.rollout.num_workers):
        from actors.common import role_resources

        pg = tensor_parallel_group(role_resources(cfg, "rollout"), name=f"{namespace}-rollout-{i}")
        wait_placement_group(pg, field_hint="rollout.tensor_parallel_size / rollout.num_gpus")
        opts = actor_options("rollout", i, cfg, namespace=namespace, placement=pg, bundle_index=0 if pg else -1)
        handles.append(RolloutWorker.options(**opts).remote(cfg, i, backend))
    ray.get([h.ready.remote() for h in handles])
    return handles


__all__ = ["EngineGate", "HFBackend", "PartialWeightsError", "RolloutBackend", "RolloutWorker", "VLLMBackend",
           "VLLMWeightSyncExtension", "create_rollout_workers", "hf_sequence_logprobs",
           "keep_plain_cpu_linear_weights"]
