"""Input layouts of ``twodrl annotate`` and the HelpSteer-2D records it writes.

Accepted input objects (one per JSONL line):

* plain pairs: ``{"prompt": str, "chosen": X, "rejected": X, "history"?: [...]}``
  where X is a string, or ``{"text": str}``, or ``{"text": str, "segments": [...]}``
  (given segments are used as they are);
* the HelpSteer2 preference layout: ``{"prompt", "response_1", "response_2",
  "preference_strength"}``. A negative strength means response_1 is preferred, a
  positive one response_2. Strength 0 (a tie) is resolved by the judge: the response
  with the higher weighted representative score becomes chosen; an exact tie is a
  failure. HelpSteer2 packs earlier turns into the prompt, separated by
  ``<extra_id_1>User`` / ``<extra_id_1>Assistant`` markers; they are unpacked into
  ``history`` so the judge sees a real conversation.

Output: the HelpSteer-2D record of the foundation issue plus ``"index"`` (the 0-based
line of the input it came from, which makes a rerun resumable and an output auditable
against its input).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from twodrl.aspects import DEFAULT_ASPECTS, DEFAULT_WEIGHTS, weighted_score


def segment_text(text: str) -> list[str]:
    """Segments of a response, with the project's segmenter (sentence/list/code aware);
    the synthetic task's sentence split stands in while that module is absent."""
    try:
        from twodrl.segmentation import stripped_segments
    except ImportError:
        from twodrl.synthetic import split_sentences as stripped_segments
    return [s for s in stripped_segments(text) if s.strip()]


@dataclass
class PairInput:
    prompt: str
    history: list[dict]
    texts: list[str]  # [first, second] response texts
    segments: list[list[str]]
    # index into texts of the chosen response; None = decide by the judge's scores
    chosen: Optional[int] = 0
    extra: dict = field(default_factory=dict)


_EXTRA_ID_RE = re.compile(r"<extra_id_1>(User|Assistant)\s*\n?", re.IGNORECASE)


def unpack_helpsteer_prompt(prompt: str) -> tuple[str, list[dict]]:
    """Split a HelpSteer2 multi-turn prompt into (last user turn, earlier turns)."""
    if "<extra_id_1>" not in prompt:
        return prompt, []
    turns: list[dict] = []
    pos, role = 0, "user"
    for m in _EXTRA_ID_RE.finditer(prompt):
        content = prompt[pos : m.start()].strip()
        if content or turns:
            turns.append({"role": role, "content": content})
        role, pos = m.group(1).lower(), m.end()
    turns.append({"role": role, "content": prompt[pos:].strip()})
    if turns[-1]["role"] != "user":
        raise ValueError("prompt: the HelpSteer2 conversation must end with a user turn")
    return turns[-1]["content"], turns[:-1]


def _response(obj: Any, name: str) -> tuple[str, list[str]]:
    if isinstance(obj, str):
        text, segs = obj, None
    elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
        text, segs = obj["text"], obj.get("segments")
        if segs is not None and (not isinstance(segs, list) or not all(isinstance(s, str) for s in segs)):
            raise ValueError(f"{name}.segments: expected a list of strings")
    else:
        raise ValueError(f"{name}: expected a string or an object with a 'text' string, got {type(obj).__name__}")
    segs = list(segs) if segs else segment_text(text)
    if not segs:
        raise ValueError(f"{name}: the response is empty (no segments to rate)")
    return text, segs


def _history(obj: Any) -> list[dict]:
    if obj is None:
        return []
    if not isinstance(obj, list):
        raise ValueError(f"history: expected a list of {{role, content}} turns, got {type(obj).__name__}")
    out = []
    for j, turn in enumerate(obj):
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant", "system") or not isinstance(turn.get("content"), str):
            raise ValueError(f"history[{j}]: expected {{'role': user|assistant|system, 'content': str}}")
        out.append({"role": turn["role"], "content": turn["content"]})
    return out


def parse_input(obj: Any) -> PairInput:
    """One input object → :class:`PairInput`; ``ValueError`` naming the field if bad."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt: missing or not a non-empty string")
    history = _history(obj.get("history"))
    if "response_1" in obj or "response_2" in obj:
        strength = obj.get("preference_strength")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise ValueError("preference_strength: missing or not a number (HelpSteer2 layout)")
        if not history:
            prompt, history = unpack_helpsteer_prompt(prompt)
        t1, s1 = _response(obj.get("response_1"), "response_1")
        t2, s2 = _response(obj.get("response_2"), "response_2")
        chosen = 0 if strength < 0 else 1 if strength > 0 else None
        return PairInput(prompt, history, [t1, t2], [s1, s2], chosen, {"preference_strength": strength})
    if "chosen" in obj and "rejected" in obj:
        t1, s1 = _response(obj["chosen"], "chosen")
        t2, s2 = _response(obj["rejected"], "rejected")
        return PairInput(prompt, history, [t1, t2], [s1, s2], 0)
    raise ValueError("expected 'chosen' and 'rejected', or 'response_1', 'response_2' and 'preference_strength'")


def to_record(
    pair: PairInput,
    scores: Sequence[dict[str, list[int]]],
    index: Optional[int] = None,
    aspects: Sequence[str] = DEFAULT_ASPECTS,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
) -> dict:
    """The HelpSteer-2D record for an annotated pair. Raises ``ValueError`` on an
    unresolvable tie (strength 0 and equal weighted scores)."""
    chosen = pair.chosen
    if chosen is None:
        import torch

        w = [weighted_score(torch.tensor([s[a] for a in aspects], dtype=torch.float64).T, weights, aspects) for s in scores]
        if w[0] == w[1]:
            raise ValueError(f"tie: preference_strength is 0 and both responses score {w[0]:.4g}")
        chosen = 0 if w[0] > w[1] else 1
    sides = []
    for i in (chosen, 1 - chosen):
        sides.append({"text": pair.texts[i], "segments": pair.segments[i], "scores": {a: list(scores[i][a]) for a in aspects}})
    record: dict = {"prompt": pair.prompt}
    if pair.history:
        record["history"] = pair.history
    record["chosen"], record["rejected"] = sides
    if index is not None:
        record["index"] = index
    return record
