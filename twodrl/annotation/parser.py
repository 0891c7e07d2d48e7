"""Parse a judge's reply into per-segment ratings, or say precisely why it can't.

Reply format (pairwise; single mode has only the first block)::

    Response 1 Evaluation:
    <1> Evaluation: some remark
    Correctness Rating: 3
    <2> ...
    Response 2 Evaluation:
    ...

For each ``<k>`` marker the rating is the number after the next ``Rating:`` (on the
same line after the marker, or on a following line). Everything that is not a valid
rating of every segment exactly once is a :class:`ParseError` whose message is short
and specific: it is shown to the judge in the repair request and recorded as the
failure reason. Nothing else is ever raised, whatever the text (property-tested).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from twodrl.aspects import ASPECTS


class ParseError(ValueError):
    """The reply is unusable; ``str(e)`` says why (safe to show to the judge)."""


@dataclass
class ParsedReply:
    scores: list[list[int]]  # [response][segment] ratings
    monotone_repairs: int = 0  # completeness ratings raised to the running max


# Block header: "Response 2 Evaluation:", tolerant of markdown emphasis/heading marks
# and case, which real judges add freely.
_HEADER_RE = re.compile(r"^[\s#*_>]*response\s*(\d+)\s*evaluation[\s*_]*:?[\s*_]*", re.IGNORECASE | re.MULTILINE)
# Segment marker at the start of a line (after optional list/markdown decoration).
_MARKER_RE = re.compile(r"^[\s*_#>\-]*<(\d+)>", re.MULTILINE)
_RATING_RE = re.compile(r"rating[\s*_]*:[\s*_]*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def _blocks(text: str, n_responses: int) -> list[str]:
    headers = list(_HEADER_RE.finditer(text))
    if not headers:
        if n_responses == 1:
            return [text]  # single mode: a judge may omit the lone header
        raise ParseError("no 'Response 1 Evaluation:' header found")
    ids = [int(h.group(1)) for h in headers]
    expected = list(range(1, n_responses + 1))
    if ids != expected:
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ParseError(f"evaluation header(s) for response {dup} appear more than once")
        missing = [i for i in expected if i not in ids]
        extra = [i for i in ids if i not in expected]
        if missing:
            raise ParseError(f"no 'Response {missing[0]} Evaluation:' block")
        if extra:
            raise ParseError(f"unexpected 'Response {extra[0]} Evaluation:' block (only {n_responses} response(s))")
        raise ParseError(f"evaluation blocks out of order: {ids}")
    return [text[h.end() : headers[j + 1].start() if j + 1 < len(headers) else len(text)] for j, h in enumerate(headers)]


def _block_ratings(block: str, which: int, n_segments: int) -> list[str]:
    """Raw rating strings, index k-1 for segment k."""
    found: dict[int, str] = {}
    markers = list(_MARKER_RE.finditer(block))
    if not markers:
        raise ParseError(f"Response {which}: no segment lines ('<1> …') found")
    for j, m in enumerate(markers):
        k = int(m.group(1))
        end = markers[j + 1].start() if j + 1 < len(markers) else len(block)
        line_end = block.find("\n", m.end(), end)
        line_end = end if line_end < 0 else line_end
        # The rating belongs on a line after the marker line (the paper's layout);
        # a judge that writes "<k> … Rating: n" on one line is accepted as a fallback.
        r = _RATING_RE.search(block, line_end, end) or _RATING_RE.search(block, m.end(), line_end)
        if r is None:
            raise ParseError(f"Response {which}: segment <{k}> has no 'Rating: n' line")
        if k in found:
            raise ParseError(f"Response {which}: segment <{k}> is rated more than once")
        if not 1 <= k <= n_segments:
            raise ParseError(f"Response {which}: segment <{k}> does not exist (it has {n_segments} segments)")
        found[k] = r.group(1)
    missing = [k for k in range(1, n_segments + 1) if k not in found]
    if missing:
        shown = ", ".join(f"<{k}>" for k in missing[:8]) + (" …" if len(missing) > 8 else "")
        raise ParseError(f"Response {which}: no rating for segment(s) {shown} (it has {n_segments} segments)")
    return [found[k] for k in range(1, n_segments + 1)]


def parse_reply(text: str, aspect: str, counts: Sequence[int]) -> ParsedReply:
    """Ratings of every segment of every response in ``text``.

    ``counts[i]`` is the number of segments of response i+1. Validates: blocks for
    exactly responses 1..len(counts); ids 1..S each exactly once; integer ratings on
    the aspect's scale (safety: 0 or 4 only). Completeness ratings that decrease are
    raised to the running maximum and counted in ``monotone_repairs``.
    """
    if aspect not in ASPECTS:
        raise ValueError(f"unknown aspect {aspect!r}")  # caller bug, not a bad reply
    a = ASPECTS[aspect]
    if not isinstance(text, str) or not text.strip():
        raise ParseError("the reply is empty")
    blocks = _blocks(text, len(counts))
    scores: list[list[int]] = []
    repairs = 0
    for i, (block, n) in enumerate(zip(blocks, counts), start=1):
        row: list[int] = []
        for k, raw in enumerate(_block_ratings(block, i, n), start=1):
            value = float(raw)
            if not value.is_integer() or not a.valid(int(value)):
                allowed = f"{a.low} or {a.high}" if a.binary else f"a whole number {a.low}–{a.high}"
                raise ParseError(f"Response {i}: segment <{k}> rating {raw} is not {allowed}")
            row.append(int(value))
        if a.monotone:
            running = row[0]
            for k in range(1, len(row)):
                if row[k] < running:
                    row[k] = running
                    repairs += 1
                running = row[k]
        scores.append(row)
    return ParsedReply(scores=scores, monotone_repairs=repairs)


def format_reply(aspect: str, scores: Sequence[Sequence[int]], remarks: Sequence[Sequence[str]] | None = None) -> str:
    """A well-formed reply for ``scores`` (what a compliant judge writes; used by the
    local judge server and the parser's round-trip tests)."""
    from twodrl.annotation.prompts import load_templates

    label = load_templates().aspect(aspect).rating_label
    lines = []
    for i, row in enumerate(scores):
        lines.append(f"Response {i + 1} Evaluation:")
        for k, value in enumerate(row):
            remark = remarks[i][k] if remarks else "see rating"
            lines.append(f"<{k + 1}> Evaluation: {remark}")
            lines.append(f"{label}: {value}")
    return "\n".join(lines)
