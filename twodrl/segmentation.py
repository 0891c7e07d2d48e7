"""Splitting responses into the segments that 2D-DPO rates, and mapping tokens to them.

The 2D-DPO paper rates a response sentence by sentence: it splits after sentence-ending
punctuation and uses special rules for code and tables so that segments follow how a
person reads the text (its Figure 7 shows a segmented response). The rules here:

* A segment ends after sentence-ending punctuation followed by whitespace: Latin
  ``. ! ? …`` (a run such as ``?!`` or ``...`` counts once, closing quotes/brackets
  stay with it) and CJK ``。！？`` (no space needed after them).
* A ``.`` does **not** end a sentence in decimals (``3.14``: no space follows), after
  common abbreviations (``e.g.``, ``i.e.``, ``Dr.``, ``Mr.``, ``vs.`` …), after dotted
  acronyms (``U.S.``) and initials (a capital letter that opens the line or stands
  next to another initial, ``J. K. Rowling``; "the answer is B." still ends), in a
  list marker at the start of a line (``1.``, ``a.``), or when the next word starts
  in lower case (an abbreviation we do not list, as in ``approx. five``; the same
  holds for ``...`` and ``…``).
* Every line starts a new segment: LLM answers use newlines for structure (list items,
  headings, paragraphs), not for wrapping, so each list item (``-``, ``*``, ``+``,
  ``1.``) begins its own segment.
* A fenced code block (```` ``` ```` or ``~~~``) is never split at punctuation or at
  single newlines. Inside it, a blank line separates chunks that become separate
  segments (as in the paper's Figure 7, where a long server script is rated chunk by
  chunk); ``split_code_paragraphs=False`` keeps every block whole. An unclosed fence
  (a generation cut at ``max_new_tokens``) runs to the end of the text.
* A markdown table row (a line starting with ``|``) is one segment, whatever
  punctuation it holds; the ``|---|---|`` delimiter row stays with the header row
  (rating a row of dashes on its own would only add noise).
* Inline code spans (`` `x.y()` ``) never end a sentence.

Segments cover the text exactly: whitespace after a segment belongs to it, leading
whitespace belongs to the first one, so ``"".join(segment_text(t)) == t`` and no segment
is empty or whitespace-only. A text that is empty or only whitespace has **zero**
segments (there is nothing to rate), the one case where the join is not ``t``.
:func:`stripped_segments` gives the display form used in records and judge prompts.

Token alignment: a fast tokenizer's ``return_offsets_mapping`` gives every token its
character span. :func:`token_segment_ids` and :func:`batch_segment_ids` turn those into
segment indices (``-1`` for prompt, padding and special tokens), the ``*_segments``
input of :func:`twodrl.losses.two_d_dpo_loss`.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np
import torch

Span = tuple[int, int]

# Abbreviations after which "." does not end a sentence (compared lower-case, with the
# inner dots removed, so "e.g." and "eg." both match "eg").
ABBREVIATIONS: frozenset[str] = frozenset(
    {
        "eg", "ie", "cf", "vs", "viz", "etal", "al", "approx", "ca", "resp",
        "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt",
        "fig", "figs", "eq", "eqs", "sec", "ch", "vol", "pp", "eds",
    }
)  # fmt: skip

_FENCE_RE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
_TABLE_ROW_RE = re.compile(r"^[ \t]*\|")
# "|---|:--:|" or "--- | ---": the line under a table header.
_TABLE_DELIM_RE = re.compile(r"^[ \t]*\|?[ \t]*:?-{3,}:?[ \t]*(\|[ \t]*:?-{3,}:?[ \t]*)*\|?[ \t]*$")
_LIST_MARKER_RE = re.compile(r"[ \t]*(?:\d{1,3}|[A-Za-z]|[ivxlcdmIVXLCDM]{1,6})[.)](?=\s)")
_INLINE_CODE_RE = re.compile(r"`[^`\n]+`")
# Latin terminators need whitespace (or the end of the line) after them, CJK ones do not.
_LATIN_END_RE = re.compile(r"([.!?…]+)[\"'”’)\]»]*(?=\s|$)")
_CJK_END_RE = re.compile(r"[。！？]+[」』”’）】》〉]*|(?<=[\u3000-\u9fff\uff00-\uffef])…+[」』”’）】》]*")
_WORD_BEFORE_RE = re.compile(r"([\w.]+)$")
_DOTTED_ACRONYM_RE = re.compile(r"^(?:[A-Za-z]\.)+[A-Za-z]$")
_INITIAL_BEFORE_RE = re.compile(r"(?:^|\s)[A-Z]\.\s+$")
_INITIAL_AFTER_RE = re.compile(r"\s+[A-Z]\.(?=\s|$)")
_NON_SPACE_RE = re.compile(r"\S")
# The code points for which str.isspace() is true (what the regex "\s" matches), for
# finding non-space characters with numpy instead of a Python loop over the text.
_WHITESPACE = np.array(
    [0x9, 0xA, 0xB, 0xC, 0xD, 0x1C, 0x1D, 0x1E, 0x1F, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
     0x2028, 0x2029, 0x202F, 0x205F, 0x3000],
    dtype=np.uint32,
)  # fmt: skip


def non_space_positions(text: str) -> np.ndarray:
    """Sorted indices of the non-whitespace characters of ``text``."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return np.flatnonzero(~np.isin(codes, _WHITESPACE))


def _dot_is_sentence_end(line: str, dot: int) -> bool:
    """Whether the single "." at ``line[dot]`` can end a sentence, judging by the word
    before it (list markers, abbreviations, initials)."""
    marker = _LIST_MARKER_RE.match(line)
    if marker is not None and marker.end() == dot + 1:
        return False  # "1. First step" / "a. option": a list marker, not a sentence
    tail_from = max(0, dot - 32)  # look back a bounded amount: long lines stay linear
    word_m = _WORD_BEFORE_RE.search(line, tail_from, dot)
    if word_m:
        word = word_m.group(1)
        if word.replace(".", "").lower() in ABBREVIATIONS:
            return False
        if _DOTTED_ACRONYM_RE.match(word):
            return False  # "U.S."
        if len(word) == 1 and word.isupper():
            # An initial when it opens the line or sits next to another initial
            # ("J. K. Rowling"); "the answer is B." or "vitamin C." end sentences.
            before = line[: word_m.start()]
            if not before.strip() or _INITIAL_BEFORE_RE.search(before) or _INITIAL_AFTER_RE.match(line, dot + 1):
                return False
    return True


def _sentence_cuts(line: str, base: int, out: list[int]) -> None:
    """Append to ``out`` the absolute positions right after each sentence end in one
    line of prose (``base`` = the line's offset in the text)."""
    protected = [m.span() for m in _INLINE_CODE_RE.finditer(line)]

    def inside_code(i: int) -> bool:
        return any(a <= i < b for a, b in protected)

    for m in _LATIN_END_RE.finditer(line):
        start = m.start(1)
        if inside_code(start):
            continue
        run = m.group(1)
        if run == "." and not _dot_is_sentence_end(line, start):
            continue
        if set(run) <= {".", "…"} and line[m.end() :].lstrip()[:1].islower():
            continue  # "approx. five", "wait... what": the sentence goes on
        out.append(base + m.end())
    for m in _CJK_END_RE.finditer(line):
        if not inside_code(m.start()):
            out.append(base + m.end())


def _cut_positions(text: str, split_code_paragraphs: bool) -> list[int]:
    """Raw cut candidates (a new segment starts at or after each, once whitespace is
    skipped)."""
    cuts: list[int] = []
    pos = 0
    fence: Optional[str] = None  # the opening fence while inside a code block
    code_has_content = False
    blank_in_code = False
    prev_table_header = False
    for line in text.splitlines(keepends=True):
        start, pos = pos, pos + len(line)
        body = line.rstrip("\r\n")
        if fence is not None:
            stripped = body.strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) <= {fence[0]}:
                fence = None  # closing fence: the block ends with this line
                cuts.append(pos)
            elif not stripped:
                blank_in_code = True
            else:
                if split_code_paragraphs and code_has_content and blank_in_code:
                    cuts.append(start)
                code_has_content, blank_in_code = True, False
            continue
        m = _FENCE_RE.match(body)
        if m:
            fence, code_has_content, blank_in_code = m.group(1), False, False
            cuts.append(start)
            prev_table_header = False
            continue
        if prev_table_header and _TABLE_DELIM_RE.match(body):
            cuts.append(pos)  # the delimiter row joins the header row before it
            prev_table_header = False
            continue
        if _TABLE_ROW_RE.match(body):
            cuts.append(start)  # sentences inside a row do not split it
            prev_table_header = True
            continue
        prev_table_header = False
        cuts.append(start)
        _sentence_cuts(body, start, cuts)
    return cuts


def segment_spans(text: str, *, split_code_paragraphs: bool = True) -> list[Span]:
    """Character spans ``[(start, end), ...]`` of the segments of ``text``: contiguous,
    starting at 0 and ending at ``len(text)`` (none when ``text`` is blank)."""
    non_space = non_space_positions(text)
    if len(non_space) == 0:
        return []
    # Each segment but the first starts on a non-space character, so whitespace after
    # a cut belongs to the segment before it.
    cuts = np.asarray(_cut_positions(text, split_code_paragraphs), dtype=np.int64)
    idx = np.searchsorted(non_space, cuts)
    starts = non_space[idx[idx < len(non_space)]]
    starts = np.unique(starts[starts > non_space[0]])
    bounds = [0, *starts.tolist(), len(text)]
    return list(zip(bounds[:-1], bounds[1:]))


def segment_text(text: str, *, split_code_paragraphs: bool = True) -> list[str]:
    """The segments of ``text``, whitespace included: ``"".join(...) == text``."""
    return [text[a:b] for a, b in segment_spans(text, split_code_paragraphs=split_code_paragraphs)]


def stripped_segments(text: str, *, split_code_paragraphs: bool = True) -> list[str]:
    """The segments without surrounding whitespace (how records and judges show them)."""
    return [s.strip() for s in segment_text(text, split_code_paragraphs=split_code_paragraphs)]


# ----------------------------------------------------------------------- alignment


def _flexible_pattern(needle: str) -> re.Pattern:
    """``needle`` with every whitespace run matching any whitespace run (records that
    collapsed newlines or double spaces still align)."""
    return re.compile(r"\s+".join(re.escape(part) for part in needle.split()))


def _find_segment(text: str, needle: str, pos: int, anchored: bool) -> Optional[Span]:
    """Span of ``needle`` at ``pos`` (``anchored``) or the first one after it; exact
    first, then with whitespace runs matched loosely."""
    if anchored:
        if text.startswith(needle, pos):
            return pos, pos + len(needle)
        hit = _flexible_pattern(needle).match(text, pos)
        return hit.span() if hit else None
    at = text.find(needle, pos)
    hit = _flexible_pattern(needle).search(text, pos)
    if at >= 0 and (hit is None or at <= hit.start()):
        return at, at + len(needle)
    return hit.span() if hit else None


def align_segments(text: str, segments: Sequence[str], *, strict: bool = True) -> list[Span]:
    """Spans of externally given ``segments`` (stripped or not) inside ``text``.

    The segments must appear in order. The returned spans cover ``text`` like
    :func:`segment_spans` does: leading whitespace joins the first span and whatever
    lies between two segments joins the earlier one. With ``strict`` (default) that
    in-between text must be whitespace and each segment must start at the next
    non-space character; otherwise segments are searched forward and uncovered text is
    absorbed. Raises ``ValueError`` naming the segment that does not fit.
    """
    if not segments:
        if text.strip():
            raise ValueError("no segments given for a non-empty text")
        return []
    starts: list[int] = []
    cursor = 0
    for i, seg in enumerate(segments):
        needle = seg.strip()
        if not needle:
            raise ValueError(f"segment {i} is empty")
        m = _NON_SPACE_RE.search(text, cursor)
        pos = m.start() if m else len(text)
        found = _find_segment(text, needle, pos, anchored=strict)
        if found is None:
            if strict:
                raise ValueError(
                    f"segment {i} ({needle[:40]!r}) does not match the text at char {pos} "
                    f"({text[pos:pos + 40]!r})"
                )
            raise ValueError(f"segment {i} ({needle[:40]!r}) not found in the text after char {pos}")
        starts.append(0 if i == 0 else found[0])
        cursor = found[1]
    if strict and text[cursor:].strip():
        raise ValueError(f"text after the last segment is not in any segment: {text[cursor:cursor + 40]!r}")
    bounds = starts + [len(text)]
    return list(zip(bounds[:-1], bounds[1:]))


def batch_segment_ids(
    offsets,
    response_starts: Sequence[int],
    spans: Sequence[Sequence[Span]],
    responses: Optional[Sequence[str]] = None,
    attention_mask=None,
) -> torch.Tensor:
    """Segment index of every token of a tokenized batch, ``LongTensor[B, T]``.

    ``offsets``: ``[B, T, 2]`` character offsets of each token in its rendered sequence
    (``tokenizer(..., return_offsets_mapping=True)["offset_mapping"]``, tensor or
    lists). ``response_starts[b]``: where the response begins in sequence ``b``;
    ``spans[b]``: its segment spans relative to the response (from
    :func:`segment_spans` or :func:`align_segments`); ``responses[b]``: the response
    text, used to find each token's first non-space character.

    A token belongs to the response when it overlaps ``[start, start + len)``; it gets
    the segment holding its first non-space character inside the response (a token
    straddling a boundary, like ``" The"`` after a full stop, goes to the segment its
    word starts), a whitespace-only token gets the segment it lies in (the earlier
    one). Prompt tokens, tokens after the response (end-of-turn markers), special
    tokens with ``(0, 0)`` offsets and padding (``attention_mask == 0``) get ``-1``.
    A zero-width token at ``p > 0`` is a space token whose offsets were trimmed: it
    counts as covering character ``p - 1``. Without
    ``responses`` a token's last character decides instead, which is exact for
    tokenizers that never merge a word with the punctuation before it.
    """
    off = torch.as_tensor(offsets, dtype=torch.long)
    if off.dim() != 3 or off.shape[-1] != 2:
        raise ValueError(f"offsets must have shape [B, T, 2], got {tuple(off.shape)}")
    B, T, _ = off.shape
    if len(response_starts) != B or len(spans) != B or (responses is not None and len(responses) != B):
        raise ValueError(f"batch of {B} sequences needs {B} response_starts, spans (and responses)")
    base = torch.as_tensor(list(response_starts), dtype=torch.long)[:, None]
    lengths = torch.tensor([s[-1][1] if len(s) else 0 for s in spans], dtype=torch.long)[:, None]
    big = int(off.max().item()) + int(lengths.max().item()) + 1 if off.numel() else 1

    start, end = off[..., 0], off[..., 1]
    # Tokenizers that trim offsets (ByteLevel ``trim_offsets=True``) shrink a lone
    # space token to zero width at the position after it; read it as covering the
    # character before. Zero width at 0 is a special token (BOS) or padding.
    trimmed = (end == start) & (start > 0)
    start = torch.where(trimmed, start - 1, start)
    lo = (start - base).clamp(min=0)
    hi = torch.minimum(end - base, lengths)
    is_response = (end > start) & (hi > lo)
    if attention_mask is not None:
        is_response &= torch.as_tensor(attention_mask).bool()

    # Segment start positions, padded with a value past every token.
    S = max((len(s) for s in spans), default=0)
    if S == 0:
        return torch.full((B, T), -1, dtype=torch.long)
    seg_starts = torch.full((B, S), big, dtype=torch.long)
    for b, sp in enumerate(spans):
        if len(sp):
            seg_starts[b, : len(sp)] = torch.tensor([a for a, _ in sp], dtype=torch.long)
            seg_starts[b, 0] = 0  # text before the first span belongs to it

    if responses is not None:
        ns_lists = [non_space_positions(r) for r in responses]
        N = max(1, max(len(x) for x in ns_lists))
        non_space = torch.full((B, N), big, dtype=torch.long)
        for b, x in enumerate(ns_lists):
            if len(x):
                non_space[b, : len(x)] = torch.from_numpy(x.astype(np.int64))
        idx = torch.searchsorted(non_space, lo.contiguous()).clamp(max=N - 1)
        first = non_space.gather(1, idx)
        anchor = torch.where(first < hi, first, lo)
    else:
        anchor = (hi - 1).clamp(min=0)
    seg = torch.searchsorted(seg_starts, anchor.contiguous(), right=True) - 1
    return torch.where(is_response, seg.clamp(min=0), torch.full_like(seg, -1))


def token_segment_ids(
    offsets: Sequence[Sequence[int]],
    spans: Sequence[Span],
    offset_base: int = 0,
    text: Optional[str] = None,
) -> list[int]:
    """Segment index of each token of one sequence (``-1`` outside the response).

    ``offsets``: per-token ``(start, end)`` character offsets in the rendered sequence;
    ``offset_base``: where the response starts in it; ``spans``: the response's
    segment spans; ``text``: the response text (see :func:`batch_segment_ids` for the
    rules and why the text matters).
    """
    off = torch.as_tensor(offsets, dtype=torch.long).reshape(1, -1, 2)
    ids = batch_segment_ids(off, [offset_base], [list(spans)], None if text is None else [text])
    return ids[0].tolist()


def segment_token_counts(segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Tokens per segment for ``[T]`` or ``[B, T]`` ids (``[S]`` or ``[B, S]``)."""
    ids = torch.as_tensor(segment_ids, dtype=torch.long)
    flat = ids.reshape(-1, ids.shape[-1])
    valid = flat >= 0
    out = torch.zeros(flat.shape[0], num_segments, dtype=torch.long)
    out.scatter_add_(1, flat.clamp(min=0), valid.long())
    return out.reshape(*ids.shape[:-1], num_segments)
