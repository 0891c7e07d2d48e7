"""Readers that turn other preference layouts into HelpSteer-2D records
(:class:`twodrl.data.PreferenceRecord`), behind ``twodrl convert --from FORMAT IN OUT``
and the offline job's ``data.format``.

Formats
- ``helpsteer2d`` (alias ``annotate``, what ``twodrl annotate`` writes): the native
  record, validated as is; segments that do not concatenate back to their response
  text stop the load with the row named.
- ``helpsteer2``: NVIDIA HelpSteer2's layout, one rated response per row (``prompt``,
  ``response``, ``helpfulness``, ``correctness``, ``coherence``, ``complexity``,
  ``verbosity``, each 0–4). Rows are grouped by prompt; each prompt with at least two
  differently weighted responses gives one pair (best vs worst weighted response), every
  response one segment rated on the five attributes.
- ``preference``: TRL's preference layout (``prompt``/``chosen``/``rejected`` as plain
  strings or conversational message lists, or implicit-prompt conversations with no
  ``prompt`` column); UltraFeedback binarized is this layout plus ``score_chosen`` /
  ``score_rejected`` (1–10). Each response becomes one segment rated on helpfulness
  only (the scores mapped onto 0–4 when given, else chosen 4 / rejected 0).
- ``auto``: picked from the first row's columns.

All functions are pure (rows in, records out); :func:`load_preference_data` adds the
file reading of :mod:`twodrl.data`.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, Optional, Sequence

from twodrl.aspects import HELPSTEER_ASPECTS
from twodrl.data import (
    DataError,
    LoadResult,
    PreferenceRecord,
    Response,
    _iter_rows,
    parse_record,
)

FORMATS = ("auto", "helpsteer2d", "annotate", "helpsteer2", "preference", "ultrafeedback")

# HelpSteer2 paper's reward weighting of its five attributes (helpfulness, correctness,
# coherence, complexity, verbosity): more verbose is slightly worse. Used only to decide
# which response of a prompt is "best" and which "worst".
HELPSTEER2_PAIR_WEIGHTS: dict[str, float] = {
    "helpfulness": 0.65, "correctness": 0.8, "coherence": 0.45, "complexity": 0.55, "verbosity": -0.4,
}


def detect_format(row: Any, where: str = "<row>") -> str:
    """The layout of one row: ``helpsteer2d``, ``helpsteer2`` or ``preference``."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
    chosen = row.get("chosen")
    if isinstance(chosen, dict) or (isinstance(chosen, str) and chosen.lstrip().startswith("{") and "segments" in chosen):
        return "helpsteer2d"
    if "response" in row and "helpfulness" in row:
        return "helpsteer2"
    if "chosen" in row and "rejected" in row:
        return "preference"
    raise DataError(
        f"{where}: cannot tell the layout from the columns {sorted(row)[:12]}; expected HelpSteer-2D "
        "(chosen/rejected objects with segments), HelpSteer2 (response + helpfulness ...) or "
        "TRL preference (chosen/rejected strings or message lists)"
    )


# --------------------------------------------------------------------------- helpers


def _one_segment(text: str, ratings: dict[str, int], name: str, where: str) -> Response:
    if not isinstance(text, str):
        raise DataError(f"{where}: {name} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(f"{where}: {name} is empty")
    return Response(text=text, segments=[text.strip()], scores={a: [int(v)] for a, v in ratings.items()})


def _message_list(value: Any, name: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {name} must be a non-empty list of {{role, content}} messages")
    return _checked_turns(value, name, where)


def _checked_turns(value: list, name: str, where: str) -> list[dict]:
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str) or not isinstance(turn.get("role"), str):
            raise DataError(f"{where}: {name}[{i}] must be an object with string role and content")
        if turn["role"] not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{where}: {name}[{i}].role must be system, user, assistant or tool, got {turn['role']!r}")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def _split_prompt_turns(turns: list[dict], name: str, where: str) -> tuple[str, list[dict]]:
    """(the last user turn, the turns before it) of a conversational prompt."""
    for i in range(len(turns) - 1, -1, -1):
        if turns[i]["role"] == "user":
            return turns[i]["content"], turns[:i] + turns[i + 1:]
    raise DataError(f"{where}: {name} has no user turn to take as the prompt")


def _response_text(value: Any, name: str, where: str) -> tuple[str, list[dict]]:
    """A response as text, plus any conversation turns it carried before the answer
    (implicit-prompt rows keep the whole conversation in ``chosen``/``rejected``)."""
    if isinstance(value, str):
        return value, []
    turns = _message_list(value, name, where)
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: {name} must end with an assistant message, got {turns[-1]['role']!r}")
    return turns[-1]["content"], turns[:-1]


def _score_to_rating(score: Any, name: str, where: str) -> int:
    """UltraFeedback's 1–10 overall score on the 0–4 scale (nearest integer)."""
    if isinstance(score, bool) or not isinstance(score, (int, float)) or score != score:
        raise DataError(f"{where}: {name} must be a number, got {score!r}")
    if not 1 <= score <= 10:
        raise DataError(f"{where}: {name} = {score} is outside UltraFeedback's 1..10 scale")
    return int(round((float(score) - 1.0) * 4.0 / 9.0))


# --------------------------------------------------------------------------- parsers


def parse_preference_row(row: Any, where: str = "<row>") -> PreferenceRecord:
    """One TRL preference row (or UltraFeedback binarized) → a one-segment,
    helpfulness-only HelpSteer-2D record."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise DataError(f"{where}: {key} is missing")
    chosen, chosen_ctx = _response_text(row["chosen"], "chosen", where)
    rejected, rejected_ctx = _response_text(row["rejected"], "rejected", where)
    prompt_value = row.get("prompt")
    history: list[dict] = []
    if prompt_value is None:
        # Implicit prompt: the conversation before the answers is shared by both sides.
        if not chosen_ctx or chosen_ctx != rejected_ctx:
            raise DataError(f"{where}: prompt is missing and chosen/rejected do not share the turns before their answers")
        prompt, history = _split_prompt_turns(chosen_ctx, "chosen", where)
    elif isinstance(prompt_value, str):
        prompt = prompt_value
        # UltraFeedback repeats the prompt as the first turn of chosen/rejected.
        if chosen_ctx and _split_prompt_turns(chosen_ctx, "chosen", where)[0] != prompt:
            raise DataError(f"{where}: chosen carries a conversation whose last user turn is not the prompt")
    else:
        prompt, history = _split_prompt_turns(_message_list(prompt_value, "prompt", where), "prompt", where)
    if not prompt.strip():
        raise DataError(f"{where}: prompt is empty")
    if "score_chosen" in row or "score_rejected" in row:
        rc = _score_to_rating(row.get("score_chosen"), "score_chosen", where)
        rr = _score_to_rating(row.get("score_rejected"), "score_rejected", where)
    else:
        rc, rr = 4, 0
    extra = {k: row[k] for k in ("prompt_id", "id") if row.get(k) is not None}
    return PreferenceRecord(
        prompt=prompt,
        chosen=_one_segment(chosen, {"helpfulness": rc}, "chosen", where),
        rejected=_one_segment(rejected, {"helpfulness": rr}, "rejected", where),
        history=history,
        extra=extra,
    )


def _helpsteer2_rating(row: dict, aspect: str, where: str) -> int:
    v = row.get(aspect)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or float(v) != int(v) or not 0 <= v <= 4:
        raise DataError(f"{where}: {aspect} must be an integer rating 0..4, got {v!r}")
    return int(v)


def pair_helpsteer2_rows(
    rows: Iterable[tuple[str, Any]], weights: Optional[dict[str, float]] = None
) -> list[PreferenceRecord]:
    """HelpSteer2 rows ``(where, row)`` → one record per prompt: its best weighted
    response (chosen) against its worst (rejected); prompts with one response, or whose
    responses all weigh the same, give none. The earliest row wins a tie."""
    weights = dict(weights or HELPSTEER2_PAIR_WEIGHTS)
    groups: dict[str, list[tuple[float, int, Response]]] = {}
    order: list[str] = []
    for n, (where, row) in enumerate(rows):
        if isinstance(row, DataError):
            raise row
        if not isinstance(row, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
        prompt, text = row.get("prompt"), row.get("response")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: prompt must be a non-empty string")
        ratings = {a: _helpsteer2_rating(row, a, where) for a in HELPSTEER_ASPECTS}
        resp = _one_segment(text, ratings, "response", where)
        score = sum(weights.get(a, 0.0) * r for a, r in ratings.items())
        if prompt not in groups:
            groups[prompt] = []
            order.append(prompt)
        groups[prompt].append((score, n, resp))
    out = []
    for prompt in order:
        group = groups[prompt]
        best = max(group, key=lambda t: (t[0], -t[1]))
        worst = min(group, key=lambda t: (t[0], t[1]))
        if best[0] == worst[0]:
            continue
        out.append(PreferenceRecord(prompt=prompt, chosen=best[2], rejected=worst[2]))
    return out


def convert_rows(
    rows: Iterable[tuple[str, Any]],
    fmt: str = "auto",
    aspects: Optional[Sequence[str]] = None,
    helpsteer2_weights: Optional[dict[str, float]] = None,
) -> list[PreferenceRecord]:
    """``(where, row)`` pairs (``where`` names file and line for errors) → records.
    ``aspects``: the aspects every record must rate (``helpsteer2d`` only; the other
    layouts rate what they rate)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; one of {list(FORMATS)}")
    it: Iterator[tuple[str, Any]] = iter(rows)
    if fmt == "auto":
        first = next(it, None)
        if first is None:
            return []
        where, row = first
        if isinstance(row, DataError):
            raise row
        fmt = detect_format(row, where)
        it = _chain(first, it)
    if fmt == "helpsteer2":
        return pair_helpsteer2_rows(it, helpsteer2_weights)
    out = []
    for where, row in it:
        if isinstance(row, DataError):
            raise row
        if fmt in ("helpsteer2d", "annotate"):
            out.append(parse_record(row, tuple(aspects or ()), where))
        else:
            out.append(parse_preference_row(row, where))
    return out


def _chain(first, rest):
    yield first
    yield from rest


def load_preference_data(
    source: str | os.PathLike,
    fmt: str = "auto",
    split: str = "train",
    aspects: Optional[Sequence[str]] = None,
) -> LoadResult:
    """Read ``source`` (JSONL, Parquet, a saved ``datasets`` directory or a hub name)
    in layout ``fmt``; the first bad row stops with a :class:`DataError` naming it."""
    rows, _ = _iter_rows(source, split)
    return LoadResult(records=convert_rows(rows, fmt, aspects))


def check_aspects(records: Sequence[PreferenceRecord], aspects: Sequence[str], source: str) -> None:
    """Every record must rate every configured aspect (the loss reads them all); the
    error names the first record that does not and what to configure instead."""
    for i, rec in enumerate(records):
        for side in ("chosen", "rejected"):
            missing = [a for a in aspects if a not in getattr(rec, side).scores]
            if missing:
                have = sorted(getattr(rec, side).scores)
                raise DataError(
                    f"{source}: record {i}: {side} is not rated on {missing} (it rates {have}); set aspects.names "
                    f"to aspects the data rates, e.g. --set aspects.names={have} with matching aspects.weights"
                )


__all__ = [
    "FORMATS", "HELPSTEER2_PAIR_WEIGHTS", "check_aspects", "convert_rows", "detect_format", "load_preference_data",
    "pair_helpsteer2_rows", "parse_preference_row",
]
