"""The 2D segment reward model (2D-DPO, Appendix C.4) and DPA's sequence-level
multi-objective reward model, with one training / scoring / evaluation code path.

Segment mode (``mode="segment"``): a decoder backbone with a linear head on every
token, i.e. a stock ``*ForTokenClassification`` model with ``num_labels = A`` (one
output per aspect). The score of segment k is the head's output at the *last token of
segment k*; for the last segment that is the end-of-turn token. Training regresses the
0–4 ratings with MSE, averaged over the (segment, aspect) cells that have a label
(missing labels, NaN, are masked out).

Sequence mode (``mode="sequence"``): a stock ``*ForSequenceClassification`` model; one
vector per response read at its last token (the end-of-turn token, which is also where
Hugging Face's own pooling reads it). Targets are the response's representative
ratings (per-aspect reduction over segments, :func:`twodrl.aspects.representative_scores`)
or, for HelpSteer-style data, the response-level ratings given directly.

Using standard HF classes means the checkpoint loads in transformers and in any server
that knows those classes, without custom code.

Language-modelling regulariser (DPA practice, ``lm_loss_coef > 0``): classification
models have no LM head, so the next-token loss on response tokens is computed from the
same backbone's final hidden states through the input embedding matrix (a tied LM
head). That adds no parameters and keeps the checkpoint a plain classification model.

:func:`reward_loss` is the whole training step's math on one batch, so a DeepSpeed
engine can run the same step (``engine(**inputs)`` as ``forward``, ``engine.backward``,
``engine.step``); :func:`train_reward_model` is the plain single-process CPU loop.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from twodrl.aspects import ASPECTS, representative_scores
from twodrl.models.logprobs import EncodedBatch, EncodedPair, _unwrap, assemble, encode_pairs, encode_sequences, pad_id_of

# --------------------------------------------------------------------------- examples


@dataclass
class RMExample:
    """One rated response: what the reward model sees and what it should predict."""

    prompt: str
    text: str
    segments: list[str] | None
    labels: torch.Tensor  # [S, A] (segment mode) or [1, A] (sequence mode); NaN = missing
    history: list[dict] | None = None
    system: str | None = None


def _as_dict(record: Any) -> dict:
    return record.to_json() if hasattr(record, "to_json") else record


def aspect_names(model) -> list[str]:
    """The aspect order of the model's outputs (its ``id2label``)."""
    cfg = _unwrap(model).config
    return [cfg.id2label[i] for i in range(cfg.num_labels)]


def model_mode(model) -> str:
    name = type(_unwrap(model)).__name__
    return "sequence" if name.endswith("ForSequenceClassification") else "segment"


def _side_labels(side: dict, aspects: Sequence[str], mode: str, where: str) -> torch.Tensor:
    segments = side.get("segments")
    S = len(segments) if segments else None
    scores = side.get("scores") or {}
    if mode == "segment":
        if S is None:
            raise ValueError(f"{where}: segment-mode training needs the response's 'segments'")
        out = torch.full((S, len(aspects)), math.nan)
        for j, a in enumerate(aspects):
            v = scores.get(a)
            if v is None:
                continue
            if not isinstance(v, (list, tuple)) or len(v) != S:
                raise ValueError(f"{where}: scores.{a} must be a list of {S} ratings (one per segment), got {v!r}")
            out[:, j] = torch.tensor([math.nan if x is None else float(x) for x in v])
        return out
    out = torch.full((1, len(aspects)), math.nan)
    for j, a in enumerate(aspects):
        v = scores.get(a)
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            col = torch.tensor([float(x) for x in v if x is not None])
            if col.numel():
                # Per-segment ratings → the response's representative rating.
                out[0, j] = representative_scores(col[:, None], [a])[0] if a in ASPECTS else col.mean()
        else:
            out[0, j] = float(v)
    return out


def examples_from_records(records: Iterable[Any], aspects: Sequence[str], mode: str = "segment") -> list[RMExample]:
    """Both responses of every HelpSteer-2D record (dicts or
    :class:`twodrl.data.PreferenceRecord`) as training / evaluation examples."""
    out = []
    for i, rec in enumerate(records):
        rec = _as_dict(rec)
        for name in ("chosen", "rejected"):
            side = rec.get(name)
            if side is None:
                continue
            out.append(
                RMExample(
                    prompt=rec["prompt"],
                    text=side["text"],
                    segments=list(side["segments"]) if side.get("segments") else None,
                    labels=_side_labels(side, aspects, mode, f"record {i}.{name}"),
                    history=rec.get("history") or None,
                    system=rec.get("system"),
                )
            )
    return out


@dataclass
class RMBatch:
    enc: EncodedBatch
    labels: torch.Tensor  # [N, S_max, A] (segment) or [N, 1, A] (sequence), NaN = missing / absent


def encode_examples(tokenizer, examples: Sequence[RMExample], chunk: int = 256, progress: bool = False) -> list[EncodedPair]:
    """Tokenize and segment-align examples once (training reuses them every epoch)."""
    from tqdm.auto import tqdm

    out: list[EncodedPair] = []
    for s in tqdm(range(0, len(examples), chunk), desc="tokenize", disable=not progress):
        part = examples[s : s + chunk]
        out += encode_sequences(
            tokenizer,
            [e.prompt for e in part],
            [e.text for e in part],
            histories=[e.history for e in part],
            systems=[e.system for e in part],
            segments=[e.segments for e in part],
        )
    return out


def collate(
    tokenizer,
    examples: Sequence[RMExample],
    max_length: int = 512,
    pack: bool = False,
    encoded: Sequence[EncodedPair] | None = None,
) -> RMBatch:
    """Examples → :class:`RMBatch` (``encoded``: their pre-tokenized pairs, if any)."""
    encoded = list(encoded) if encoded is not None else encode_examples(tokenizer, examples)
    enc = assemble(encoded, pad_id_of(tokenizer), max_length=max_length, pack=pack)
    S = max(e.labels.shape[0] for e in examples)
    A = examples[0].labels.shape[1]
    labels = torch.full((len(examples), S, A), math.nan)
    for i, e in enumerate(examples):
        labels[i, : e.labels.shape[0]] = e.labels
    return RMBatch(enc, labels)


# --------------------------------------------------------------------------- forward


def segment_end_positions(enc: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row and column of the last token of every (pair, segment), ``[N, S_max]`` each,
    and a ``[N, S_max]`` mask of segments that exist (and survived truncation)."""
    N, S = enc.num_pairs, max(enc.max_segments, 1)
    R, T = enc.input_ids.shape
    mask = enc.response_mask
    flat = enc.pair_ids[mask] * S + enc.segment_ids[mask]
    lin = torch.arange(R * T, device=mask.device).view(R, T)[mask]
    last = torch.full((N * S,), -1, dtype=torch.long, device=mask.device)
    last = last.scatter_reduce(0, flat, lin, reduce="amax", include_self=True).view(N, S)
    valid = last >= 0
    last = last.clamp(min=0)
    return last // T, last % T, valid


def sequence_end_positions(enc: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row and column of each pair's last response token, ``[N, 1]`` each."""
    R, T = enc.input_ids.shape
    mask = enc.response_mask
    lin = torch.arange(R * T, device=mask.device).view(R, T)[mask]
    last = torch.full((enc.num_pairs,), -1, dtype=torch.long, device=mask.device)
    last = last.scatter_reduce(0, enc.pair_ids[mask], lin, reduce="amax", include_self=True)[:, None]
    valid = last >= 0
    last = last.clamp(min=0)
    return last // T, last % T, valid


def _backbone_and_head(model):
    hf = _unwrap(model)
    return getattr(hf, hf.base_model_prefix), hf.score


def reward_forward(
    model, enc: EncodedBatch, mode: str | None = None, need_hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Scores ``[N, S, A]`` (``S = 1`` in sequence mode), their validity mask ``[N, S]``,
    and (``need_hidden``) the backbone's final hidden states ``[R, T, H]``.

    Runs the backbone once and applies the linear head only at the read-out positions.
    Calling the backbone and head submodules (instead of the classification model's
    own forward, whose sequence pooling assumes one sequence per row) keeps packed rows
    correct; ZeRO-3 parameter gathering works on submodules too.
    """
    mode = mode or model_mode(model)
    hf = _unwrap(model)
    dtype = next(hf.parameters()).dtype
    enc = enc.to(next(hf.parameters()).device)
    backbone, head = _backbone_and_head(model)
    inputs = enc.model_inputs(getattr(hf.config, "_attn_implementation", None), dtype=dtype)
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    rows, cols, valid = (segment_end_positions if mode == "segment" else sequence_end_positions)(enc)
    # A model sharded over GPUs (device_map) ends on another device than it starts on.
    picked = hidden[rows.to(hidden.device), cols.to(hidden.device)]  # [N, S, H]
    dropout = getattr(hf, "dropout", None)
    if dropout is not None:
        picked = dropout(picked)
    scores = head(picked.to(head.weight.device)).float()
    return scores, valid, (hidden if need_hidden else None)


def _tied_lm_loss(model, hidden: torch.Tensor, enc: EncodedBatch) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy on response tokens through the input embeddings,
    and the number of those tokens."""
    emb = _unwrap(model).get_input_embeddings().weight
    target_mask = enc.response_mask[:, 1:]
    h = hidden[:, :-1][target_mask]
    targets = enc.input_ids[:, 1:][target_mask]
    logits = (h @ emb.T).float()
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


def _label_cells(valid: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[N, S, A]`` mask of the cells the loss counts: the segment exists in the
    (possibly truncated) input and is rated."""
    S = min(valid.shape[1], labels.shape[1])
    return valid[:, :S, None] & ~torch.isnan(labels[:, :S])


def reward_counts(batch: RMBatch, mode: str) -> tuple[int, int]:
    """(labelled cells, LM target tokens) of a batch, without running the model: what
    :func:`reward_loss` divides by. Data-parallel ranks add theirs up to normalise by
    the whole batch's counts (``totals``)."""
    _, _, valid = (segment_end_positions if mode == "segment" else sequence_end_positions)(batch.enc)
    return int(_label_cells(valid, batch.labels).sum()), int(batch.enc.response_mask[:, 1:].sum())


def reward_loss(
    model, batch: RMBatch, lm_loss_coef: float = 0.0, mode: str | None = None,
    totals: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked MSE between predicted and labelled ratings (+ optional LM loss).

    Returns ``(loss, stats)``; stats hold floats for logging (``rm/mse``, ``rm/lm_loss``,
    ``rm/labels``, and the sums ``rm/sq_sum`` / ``rm/lm_sum`` / ``rm/lm_tokens``).

    ``totals``: (labelled cells, LM tokens) of the whole batch this one is a part of
    (:func:`reward_counts` summed over the parts). The squared errors and token losses
    are then divided by those instead of this part's own counts, so the parts' losses
    add up to the whole batch's loss: data parallelism without changing the objective.
    """
    scores, valid, hidden = reward_forward(model, batch.enc, mode, need_hidden=lm_loss_coef > 0)
    labels = batch.labels.to(scores.device)
    valid = valid.to(scores.device)
    S = min(scores.shape[1], labels.shape[1])
    scores, labels = scores[:, :S], labels[:, :S]
    cell = _label_cells(valid, labels)
    n = cell.sum()
    diff = torch.where(cell, scores - torch.nan_to_num(labels), torch.zeros_like(scores))
    sq = (diff**2).sum()
    mse = sq / (n.clamp(min=1) if totals is None else max(float(totals[0]), 1.0))
    loss = mse
    stats = {"rm/mse": float(mse.detach()), "rm/labels": float(n), "rm/sq_sum": float(sq.detach())}
    if lm_loss_coef > 0:
        lm_sum, tokens = _tied_lm_loss(model, hidden, batch.enc.to(hidden.device))
        lm = lm_sum / (max(tokens, 1) if totals is None else max(float(totals[1]), 1.0))
        loss = loss + lm_loss_coef * lm
        stats.update({"rm/lm_loss": float(lm.detach()), "rm/lm_sum": float(lm_sum.detach()), "rm/lm_tokens": float(tokens)})
    stats["rm/loss"] = float(loss.detach())
    return loss, stats


# --------------------------------------------------------------------------- training


# The optimizer of RM training, in one process and on DeepSpeed ranks alike.
RM_ADAM_BETAS = (0.9, 0.98)
RM_MAX_GRAD_NORM = 1.0


def epoch_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[list[int]]]:
    """``[epoch][step]`` → example indices: a fresh seeded shuffle per epoch, cut into
    batches of ``batch_size`` (the last one smaller). The one data order of RM training,
    in one process or split over ranks, and from any epoch on after a resume."""
    rng = random.Random(seed)
    out = []
    for _ in range(int(epochs)):
        order = list(range(n))
        rng.shuffle(order)
        out.append([order[s : s + batch_size] for s in range(0, n, batch_size)])
    return out


def rm_lr_lambda(total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``train_lr`` at step ``s``: linear warm-up over the first 5% of the
    steps, then cosine decay to 10%: stable on tiny models, and the late low learning
    rate is what turns "close" regressions into correctly rounded labels."""
    warmup = max(1, total_steps // 20)

    def fn(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total_steps - warmup)))

    return fn


def train_reward_model(
    model,
    tokenizer,
    records: Iterable[Any],
    cfg,
    progress: bool = True,
    eval_records: Iterable[Any] | None = None,
    seed: int = 0,
    log: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on the ratings of ``records`` (plain torch loop, CPU).

    ``cfg`` is a :class:`twodrl.config.ScorerConfig` (train_epochs, train_lr,
    train_batch_size, lm_loss_coef, mode, model.max_length). Returns the final
    training metrics (and, with ``eval_records``, ``eval/…`` metrics of
    :func:`evaluate`). ``log`` receives a metrics dict after every epoch.

    ``on_epoch_end(epoch, state)`` is called after every epoch with the state a resume
    needs (``{"epoch", "step", "optimizer", "scheduler"}``); ``resume`` is such a state
    (with the model's weights already loaded): training continues with the next epoch,
    in the data order and at the learning rate it would have had.
    """
    from tqdm.auto import tqdm

    mode = cfg.mode
    if mode != model_mode(model):
        raise ValueError(
            f"scorer.mode is {mode!r} but the model is a {type(_unwrap(model)).__name__}; "
            f"use a {'token' if mode == 'segment' else 'sequence'}-classification checkpoint"
        )
    aspects = aspect_names(model)
    examples = examples_from_records(records, aspects, mode)
    if not examples:
        raise ValueError("train_reward_model: no training examples")
    encoded = encode_examples(tokenizer, examples, progress=progress)
    bs = int(cfg.train_batch_size)
    plan = epoch_batches(len(examples), bs, int(cfg.train_epochs), seed)
    total = sum(len(e) for e in plan)
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.train_lr), weight_decay=0.0, betas=RM_ADAM_BETAS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, rm_lr_lambda(total))
    start, step = 0, 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        start, step = int(resume["epoch"]), int(resume["step"])
    max_len = int(cfg.model.max_length)
    model.train()
    stats: dict[str, float] = {}
    bar = tqdm(total=total, initial=step, desc="train-rm", disable=not progress, dynamic_ncols=True)
    for epoch in range(start, int(cfg.train_epochs)):
        run_mse, run_n = 0.0, 0
        for idx in plan[epoch]:
            batch = collate(tokenizer, [examples[i] for i in idx], max_length=max_len, encoded=[encoded[i] for i in idx])
            loss, st = reward_loss(model, batch, float(cfg.lm_loss_coef), mode)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), RM_MAX_GRAD_NORM)
            opt.step()
            sched.step()
            step += 1
            run_mse += st["rm/mse"]
            run_n += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, mse=f"{run_mse / run_n:.3f}")
            stats = {**st, "rm/grad_norm": float(gnorm), "rm/lr": sched.get_last_lr()[0]}
        stats.update({"rm/epoch": epoch + 1, "rm/epoch_mse": run_mse / max(run_n, 1), "rm/step": step})
        if log is not None:
            log(dict(stats))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, {"epoch": epoch + 1, "step": step, "optimizer": opt.state_dict(),
                                     "scheduler": sched.state_dict()})
            model.train()  # the callback may have evaluated
    bar.close()
    model.eval()
    if eval_records is not None:
        ev = evaluate(model, tokenizer, eval_records, progress=progress)
        stats.update({f"eval/{k}": v for k, v in flatten_eval(ev).items()})
    return stats


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def score(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    histories: Sequence[Sequence[dict] | None] | None = None,
    batch_size: int = 16,
    segments: Sequence[Sequence[str] | None] | None = None,
    systems: Sequence[str | None] | str | None = None,
    max_length: int = 512,
    clamp: bool = True,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Ratings of each response: ``[S, A]`` per response in segment mode (segments from
    the segmenter unless given), ``[1, A]`` in sequence mode; on the aspects' 0–4 scale
    (clamped unless ``clamp=False``). Segments cut off by ``max_length`` are scored
    from what remains (their last surviving token); fully truncated ones are NaN."""
    from tqdm.auto import tqdm

    n = len(prompts)
    if len(responses) != n:
        raise ValueError(f"score: {len(responses)} responses for {n} prompts")
    mode = model_mode(model)
    was_training = _unwrap(model).training
    model.eval()
    histories = list(histories) if histories is not None else [None] * n
    segments = list(segments) if segments is not None else [None] * n
    systems = [systems] * n if systems is None or isinstance(systems, str) else list(systems)
    aspects = aspect_names(model)
    lows = torch.tensor([float(ASPECTS[a].low) if a in ASPECTS else -math.inf for a in aspects])
    highs = torch.tensor([float(ASPECTS[a].high) if a in ASPECTS else math.inf for a in aspects])
    out: list[torch.Tensor] = []
    for s in tqdm(range(0, n, batch_size), desc="score", disable=not progress):
        sl = slice(s, s + batch_size)
        enc = encode_pairs(
            tokenizer, prompts[sl], responses[sl], histories[sl], systems[sl], max_length=max_length, segments=segments[sl]
        )
        scores, valid, _ = reward_forward(model, enc, mode)
        scores = scores.cpu()
        valid = valid.cpu()
        if clamp:
            scores = torch.maximum(torch.minimum(scores, highs), lows)
        scores = scores.masked_fill(~valid[..., None], math.nan)
        for i in range(scores.shape[0]):
            k = int(enc.num_segments[i]) if mode == "segment" else 1
            out.append(scores[i, :k].clone())
    if was_training:
        model.train()
    return out


# --------------------------------------------------------------------------- evaluation


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation with average ranks for ties (NaN if either side is
    constant)."""

    def ranks(v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        order = torch.argsort(v, stable=True)
        sorted_v = v[order]
        # Average rank of each run of equal values.
        new_run = torch.ones_like(sorted_v, dtype=torch.bool)
        new_run[1:] = sorted_v[1:] != sorted_v[:-1]
        run_id = torch.cumsum(new_run.long(), 0) - 1
        pos = torch.arange(1, len(v) + 1, dtype=torch.double)
        run_sum = torch.zeros(int(run_id[-1]) + 1, dtype=torch.double).index_add(0, run_id, pos)
        run_cnt = torch.zeros_like(run_sum).index_add(0, run_id, torch.ones_like(pos))
        r = torch.empty_like(pos)
        r[order] = (run_sum / run_cnt)[run_id]
        return r

    if x.numel() < 2:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.norm() * ry.norm()).item()
    return float((rx * ry).sum().item() / denom) if denom > 0 else math.nan


@torch.no_grad()
def evaluate(model, tokenizer, records: Iterable[Any], batch_size: int = 32, progress: bool = False, max_length: int = 512) -> dict[str, dict[str, float]]:
    """Per-aspect quality of the predicted ratings on labelled records.

    For each aspect: ``accuracy`` (prediction clamped to the scale and rounded to the
    nearest integer, compared with the label: the 2D-DPO paper's Table 4 metric),
    ``majority_accuracy`` (always predicting the most frequent label of these
    records: the baseline to beat), ``mse`` and ``spearman``, and ``n`` (labels).
    """
    mode = model_mode(model)
    aspects = aspect_names(model)
    examples = examples_from_records(records, aspects, mode)
    preds = score(
        model,
        tokenizer,
        [e.prompt for e in examples],
        [e.text for e in examples],
        [e.history for e in examples],
        batch_size=batch_size,
        segments=[e.segments for e in examples],
        systems=[e.system for e in examples],
        max_length=max_length,
        clamp=True,
        progress=progress,
    )
    return evaluation_metrics(examples, preds, aspects)


def evaluation_metrics(examples: Sequence[RMExample], preds: Sequence[torch.Tensor], aspects: Sequence[str]) -> dict[str, dict[str, float]]:
    """:func:`evaluate`'s table from the predictions (``score`` output, clamped) of
    ``examples``, wherever they were computed (one process, or the training ranks)."""
    P = torch.cat([p for p in preds])
    Y = torch.cat([e.labels[: p.shape[0]] for e, p in zip(examples, preds)])
    result: dict[str, dict[str, float]] = {}
    for j, a in enumerate(aspects):
        keep = ~torch.isnan(Y[:, j]) & ~torch.isnan(P[:, j])
        y, p = Y[keep, j], P[keep, j]
        if y.numel() == 0:
            result[a] = {"accuracy": math.nan, "majority_accuracy": math.nan, "mse": math.nan, "spearman": math.nan, "n": 0}
            continue
        values, counts = torch.unique(y, return_counts=True)
        result[a] = {
            "accuracy": float((p.round() == y).float().mean()),
            "majority_accuracy": float(counts.max() / y.numel()),
            "majority_label": float(values[counts.argmax()]),
            "mse": float(((p - y) ** 2).mean()),
            "spearman": spearman(p, y),
            "n": int(y.numel()),
        }
    return result


def flatten_eval(result: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{"helpfulness": {"accuracy": …}}`` → ``{"rm/helpfulness/accuracy": …}``."""
    return {f"rm/{a}/{k}": v for a, d in result.items() for k, v in d.items()}


def format_eval_table(result: dict[str, dict[str, float]]) -> str:
    """The per-aspect table ``eval-rm`` prints."""
    head = f"{'aspect':<14}{'accuracy':>10}{'majority':>10}{'Δ':>8}{'MSE':>9}{'Spearman':>10}{'n':>7}"
    lines = [head, "-" * len(head)]
    for a, d in result.items():
        delta = d["accuracy"] - d["majority_accuracy"]
        lines.append(
            f"{a:<14}{d['accuracy']:>10.3f}{d['majority_accuracy']:>10.3f}{delta:>+8.3f}{d['mse']:>9.3f}{d['spearman']:>10.3f}{d['n']:>7}"
        )
    return "\n".join(lines)
