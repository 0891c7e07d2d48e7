"""Per-token log-probabilities of responses, aligned with segment ids.

``encode_pairs`` renders each (prompt, response) pair with the chat template, tokenizes
the prompt and the response separately (so the response tokens are exactly the ones
the policy produces after the generation prompt), appends the end-of-turn token, and
records for every response token which segment it belongs to. ``response_logprobs``
runs the model once over the batch and returns ``log π(y_t | x, y_<t)`` at each
response token's position.

Packing (``pack=True``) puts several pairs in one row. Isolation between them comes
from two things: ``position_ids`` restart at 0 for every pair (so RoPE sees each pair
as its own sequence), and attention is restricted by an explicit 4D block-diagonal
causal mask (token i may attend to token j only if j ≤ i and both belong to the same
pair). The additive float form of that mask works with both the eager and the SDPA
attention of Hugging Face models, which is what runs on CPU. With
``flash_attention_2`` (GPU) the mask is left out instead: HF's flash path detects the
packed layout from the restarting ``position_ids`` and calls the varlen kernel, which
never materialises a T×T mask.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Sequence

import torch

# End-of-turn markers of common chat formats, most specific first.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")

Message = dict  # {"role": ..., "content": ...}


# ------------------------------------------------------------------------ rendering


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn (``<|im_end|>`` for ChatML), falling back
    to eos. Every encoded response ends with it; it belongs to the last segment."""
    vocab = tokenizer.get_vocab()
    for tok in _END_OF_TURN_TOKENS:
        if tok in vocab:
            return vocab[tok]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither an end-of-turn token nor an eos token")
    return int(tokenizer.eos_token_id)


def render_prompt(
    tokenizer,
    prompt: str,
    history: Sequence[Message] | None = None,
    system: str | None = None,
) -> str:
    """The text the policy is conditioned on: optional system message, earlier turns
    (``history``: list of ``{"role", "content"}``), the user ``prompt``, then the
    assistant generation prompt, all through the tokenizer's chat template. Tokenizers
    without a template (base models) get a plain ``User:/Assistant:`` layout."""
    messages: list[Message] = []
    if system:
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(history or ()):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"history[{i}]: expected a {{'role', 'content'}} mapping, got {m!r}")
        messages.append({"role": m["role"], "content": m["content"]})
    messages.append({"role": "user", "content": prompt})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [f"{m['role'].capitalize()}: {m['content']}\n" for m in messages]
    return "".join(parts) + "Assistant: "


# ------------------------------------------------------------------------ segments


def _response_segment_ids(
    tokenizer_offsets: Sequence[tuple[int, int]], text: str, segments: Sequence[str] | None, where: str
) -> tuple[list[int], int]:
    """Segment id of every response token (response tokenized on its own, so offsets
    are relative to ``text``) and the number of segments. Spans come from the given
    ``segments`` when known, else from the segmenter; alignment rules are the
    segmenter's (:func:`twodrl.segmentation.batch_segment_ids`)."""
    from twodrl.segmentation import align_segments, segment_spans, token_segment_ids

    try:
        spans = align_segments(text, list(segments)) if segments is not None else segment_spans(text)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not spans or not tokenizer_offsets:
        return [0] * len(tokenizer_offsets), max(len(spans), 1)
    ids = token_segment_ids([list(o) for o in tokenizer_offsets], spans, 0, text)
    # A response token that touches no segment character cannot occur (segments cover
    # the text); be safe and give it the previous token's segment.
    prev = 0
    for t, k in enumerate(ids):
        if k < 0:
            ids[t] = prev
        prev = ids[t]
    return ids, len(spans)


# ------------------------------------------------------------------------ batches


@dataclass
class EncodedBatch:
    """Token tensors of a batch of (prompt, response) pairs; ``[R, T]`` each.

    Unpacked: R = number of pairs, row i is pair i (right-padded). Packed: several
    pairs per row; ``pair_ids`` says which. ``segment_ids`` is the segment index (within
    its pair) of each response token and −1 elsewhere.
    """

    input_ids: torch.Tensor  # long
    attention_mask: torch.Tensor  # long, 1 on real tokens
    position_ids: torch.Tensor  # long, restart at 0 for every pair
    response_mask: torch.Tensor  # bool, True on response tokens (incl. end-of-turn)
    segment_ids: torch.Tensor  # long, −1 outside responses
    pair_ids: torch.Tensor  # long, −1 on padding
    num_segments: torch.Tensor  # long [N]
    prompt_lengths: torch.Tensor  # long [N] (after truncation)
    response_lengths: torch.Tensor  # long [N] (after truncation, incl. end-of-turn)
    packed: bool = False

    @property
    def num_pairs(self) -> int:
        return int(self.num_segments.numel())

    @property
    def max_segments(self) -> int:
        return int(self.num_segments.max()) if self.num_pairs else 0

    def to(self, device: str | torch.device) -> "EncodedBatch":
        moved = {f.name: (getattr(self, f.name).to(device) if torch.is_tensor(getattr(self, f.name)) else getattr(self, f.name)) for f in fields(self)}
        return replace(self, **moved)

    def attention_mask_4d(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Additive ``[R, 1, T, T]`` mask: 0 where query i may attend key j (same pair,
        j ≤ i), the dtype's minimum elsewhere. Padding queries attend to themselves
        only, so no row is fully masked (which would give NaNs in softmax)."""
        T = self.input_ids.shape[1]
        pid = self.pair_ids
        same = (pid[:, :, None] == pid[:, None, :]) & (pid[:, None, :] >= 0)
        causal = torch.ones(T, T, dtype=torch.bool, device=pid.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=pid.device)
        allowed = (same & causal) | eye
        mask = torch.zeros(allowed.shape, dtype=dtype, device=pid.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def model_inputs(self, attn_implementation: str | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """Keyword arguments for a Hugging Face model's forward."""
        if not self.packed:
            return dict(input_ids=self.input_ids, attention_mask=self.attention_mask, position_ids=self.position_ids)
        if attn_implementation and "flash" in attn_implementation:
            # Varlen kernel, packed layout detected from restarting position_ids.
            return dict(input_ids=self.input_ids, position_ids=self.position_ids)
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask_4d(dtype), position_ids=self.position_ids)

    # Reductions used by the losses: vectorised scatters over pair / segment ids.

    def pair_sums(self, values: torch.Tensor) -> torch.Tensor:
        """``[R, T]`` per-token values → ``[N]`` sums over each pair's response tokens."""
        mask = self.response_mask
        out = values.new_zeros(self.num_pairs)
        return out.index_add(0, self.pair_ids[mask], values[mask])

    def segment_sums(self, values: torch.Tensor) -> torch.Tensor:
        """``[R, T]`` → ``[N, S_max]`` sums over the tokens of each segment (0 where a
        pair has fewer segments)."""
        mask = self.response_mask
        S = max(self.max_segments, 1)
        flat = self.pair_ids[mask] * S + self.segment_ids[mask]
        out = values.new_zeros(self.num_pairs * S)
        return out.index_add(0, flat, values[mask]).view(self.num_pairs, S)

    def segment_token_counts(self) -> torch.Tensor:
        """``[N, S_max]`` number of tokens in each segment."""
        return self.segment_sums(self.response_mask.to(torch.float32)).round().long()

    def response_values(self, values: torch.Tensor) -> list[torch.Tensor]:
        """The response tokens' values of each pair, in order (list of length N)."""
        mask = self.response_mask
        ids = self.pair_ids[mask]
        vals = values[mask]
        # Row-major order keeps each pair's tokens in sequence order.
        order = torch.argsort(ids, stable=True)
        return list(torch.split(vals[order], torch.bincount(ids, minlength=self.num_pairs).tolist()))


def _as_list(x, n: int, name: str) -> list:
    if x is None:
        return [None] * n
    x = list(x)
    if len(x) != n:
        raise ValueError(f"encode_pairs: {name} has {len(x)} entries for {n} prompts")
    return x


@dataclass
class EncodedPair:
    """One tokenized pair before batching (token lists; see :func:`encode_sequences`)."""

    prompt_ids: list[int]
    response_ids: list[int]  # ends with the end-of-turn token
    segment_ids: list[int]  # one per response token
    num_segments: int


def encode_sequences(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    histories: Sequence[Sequence[Message] | None] | None = None,
    systems: Sequence[str | None] | str | None = None,
    segments: Sequence[Sequence[str] | None] | None = None,
) -> list[EncodedPair]:
    """Tokenize and segment-align each pair (no truncation, no padding). Training loops
    encode once and call :func:`assemble` per batch."""
    n = len(prompts)
    if len(responses) != n:
        raise ValueError(f"encode_pairs: {len(responses)} responses for {n} prompts")
    histories = _as_list(histories, n, "histories")
    systems = [systems] * n if isinstance(systems, str) or systems is None else _as_list(systems, n, "systems")
    segments = _as_list(segments, n, "segments")
    eot = end_of_turn_id(tokenizer)
    if n == 0:
        return []
    rendered = [render_prompt(tokenizer, p, h, s) for p, h, s in zip(prompts, histories, systems)]
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    resp_enc = tokenizer(list(responses), add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for i in range(n):
        seg, n_seg = _response_segment_ids(resp_enc["offset_mapping"][i], responses[i], segments[i], f"pair {i}")
        # The end-of-turn token closes the last segment (the reward model reads the
        # last segment's score there).
        out.append(EncodedPair(list(prompt_ids[i]), list(resp_enc["input_ids"][i]) + [eot], seg + [n_seg - 1], n_seg))
    return out


def assemble(pairs: Sequence[EncodedPair], pad_id: int, max_length: int = 512, pack: bool = False) -> EncodedBatch:
    """Truncate, pad (right) or pack encoded pairs into an :class:`EncodedBatch`.

    Pairs longer than ``max_length`` lose prompt tokens from the left first (keeping at
    least a quarter of the budget for the prompt), then response tokens from the
    right. With ``pack=True`` pairs go first-fit-decreasing into rows of ``max_length``.
    """
    if max_length < 2:
        raise ValueError(f"encode_pairs: max_length must be ≥ 2, got {max_length}")
    n = len(pairs)
    seqs: list[tuple[list[int], list[int], list[int]]] = []  # ids, is_response, segment id
    p_lens: list[int] = []
    r_lens: list[int] = []
    for e in pairs:
        p_ids, r_ids, seg = e.prompt_ids, e.response_ids, e.segment_ids
        if len(p_ids) + len(r_ids) > max_length:
            keep_p = max(max_length - len(r_ids), min(len(p_ids), max(1, max_length // 4)))
            p_ids = p_ids[len(p_ids) - keep_p:]
            r_ids, seg = r_ids[: max_length - keep_p], seg[: max_length - keep_p]
        seqs.append((p_ids + r_ids, [0] * len(p_ids) + [1] * len(r_ids), [-1] * len(p_ids) + seg))
        p_lens.append(len(p_ids))
        r_lens.append(len(r_ids))

    # Row layout: which pairs go in which row, in order.
    if pack:
        rows: list[list[int]] = []
        room: list[int] = []
        for i in sorted(range(n), key=lambda i: (-len(seqs[i][0]), i)):
            L = len(seqs[i][0])
            r = next((k for k, free in enumerate(room) if free >= L), None)
            if r is None:
                rows.append([i])
                room.append(max_length - L)
            else:
                rows[r].append(i)
                room[r] -= L
    else:
        rows = [[i] for i in range(n)]
    T = max((sum(len(seqs[i][0]) for i in row) for row in rows), default=1)
    R = len(rows)
    # Fill flat index lists, then write each tensor once.
    r_idx: list[int] = []
    c_idx: list[int] = []
    ids_f: list[int] = []
    resp_f: list[int] = []
    seg_f: list[int] = []
    pair_f: list[int] = []
    pos_f: list[int] = []
    for r, row in enumerate(rows):
        c = 0
        for i in row:
            ids, is_resp, seg = seqs[i]
            L = len(ids)
            r_idx += [r] * L
            c_idx += range(c, c + L)
            pos_f += range(L)
            ids_f += ids
            resp_f += is_resp
            seg_f += seg
            pair_f += [i] * L
            c += L
    where = (torch.tensor(r_idx, dtype=torch.long), torch.tensor(c_idx, dtype=torch.long))
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    input_ids[where] = torch.tensor(ids_f, dtype=torch.long)
    attention = torch.zeros((R, T), dtype=torch.long)
    attention[where] = 1
    positions = torch.zeros((R, T), dtype=torch.long)
    positions[where] = torch.tensor(pos_f, dtype=torch.long)
    resp_mask = torch.zeros((R, T), dtype=torch.bool)
    resp_mask[where] = torch.tensor(resp_f, dtype=torch.bool)
    seg_ids = torch.full((R, T), -1, dtype=torch.long)
    seg_ids[where] = torch.tensor(seg_f, dtype=torch.long)
    pair_ids = torch.full((R, T), -1, dtype=torch.long)
    pair_ids[where] = torch.tensor(pair_f, dtype=torch.long)
    return EncodedBatch(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        response_mask=resp_mask,
        segment_ids=seg_ids,
        pair_ids=pair_ids,
        num_segments=torch.tensor([e.num_segments for e in pairs], dtype=torch.long),
        prompt_lengths=torch.tensor(p_lens, dtype=torch.long),
        response_lengths=torch.tensor(r_lens, dtype=torch.long),
        packed=pack,
    )


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)


def encode_pairs(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    histories: Sequence[Sequence[Message] | None] | None = None,
    systems: Sequence[str | None] | str | None = None,
    max_length: int = 512,
    pack: bool = False,
    segments: Sequence[Sequence[str] | None] | None = None,
) -> EncodedBatch:
    """Tokenize (prompt, response) pairs for log-prob / reward computation.

    Each prompt is rendered with :func:`render_prompt` (optional per-pair ``histories``
    and ``systems``); each response is tokenized on its own and ends with the
    end-of-turn token. ``segments``: the segment strings of each response when known
    (e.g. annotated records); otherwise the segmenter splits the response. Truncation
    and packing: see :func:`assemble`.
    """
    pairs = encode_sequences(tokenizer, prompts, responses, histories, systems, segments)
    return assemble(pairs, pad_id_of(tokenizer), max_length=max_length, pack=pack)


# ------------------------------------------------------------------------ log-probs


def _unwrap(model):
    """The Hugging Face module under DeepSpeed / DDP wrappers (for its config)."""
    while hasattr(model, "module") and not hasattr(model, "config"):
        model = model.module
    return model


def token_logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 4) -> torch.Tensor:
    """``log softmax(logits)[labels]`` in float32, computed a few rows at a time so a
    bf16 model with a large vocabulary never holds a full float32 copy of the logits."""
    out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    for s in range(0, logits.shape[0], chunk_rows):
        lg = logits[s : s + chunk_rows].float()
        picked = lg.gather(-1, labels[s : s + chunk_rows, :, None]).squeeze(-1)
        out[s : s + chunk_rows] = picked - torch.logsumexp(lg, dim=-1)
    return out


def response_logprobs(model, batch: EncodedBatch, forward: Callable | None = None) -> torch.Tensor:
    """``[R, T]`` log-prob of every response token given everything before it in its
    pair, at the token's own position; 0 on prompt and padding positions.

    Differentiable (call under ``torch.no_grad()`` for the reference). ``forward``
    overrides how the model is called (e.g. a DeepSpeed engine); it receives the
    keyword inputs and must return logits ``[R, T, V]`` or an object with ``.logits``.
    """
    hf = _unwrap(model)
    impl = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    dtype = next(hf.parameters()).dtype
    batch = batch.to(next(hf.parameters()).device)
    inputs = batch.model_inputs(impl, dtype=dtype)
    out = (forward or model)(**inputs, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out
    # Token t is predicted from position t−1; position 0 of a pair is always a prompt
    # token, so shifting within the row never crosses a pair boundary on response tokens.
    lp = token_logprobs_from_logits(logits[:, :-1], batch.input_ids[:, 1:])
    result = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=lp.device)
    result[:, 1:] = lp
    return result * batch.response_mask
