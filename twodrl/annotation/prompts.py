"""Judge prompts: one request = one aspect × (one response, or a pair).

The wording lives in versioned package data (``templates/v1_*``), so a prompt change is
a data change with its own identity: :attr:`JudgeTemplates.id` is the version plus a
digest of the template files, and it is part of every cache key, so editing a template
can never serve answers that were given to the old wording.

Messages have a fixed, machine-readable frame (section markers, ``<k>…</k>`` segment
tags). :func:`parse_request` is the exact inverse of :func:`build_messages`; the local
judge server uses it to recover the aspect, the conversation and the segments.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping, Sequence

from twodrl.annotation.cache import messages_digest  # noqa: F401  (re-exported)
from twodrl.aspects import ASPECTS

DEFAULT_VERSION = "v1"

# Section markers of the user message. Distinctive on purpose: the parser of the local
# server (and a human reading a cached request) must find them unambiguously even
# when the conversation itself contains words like "history" or "request".
HISTORY_MARK = "=== Conversation history ==="
REQUEST_MARK = "=== User request ==="
NO_HISTORY = "(none: this is the first turn)"
_RESPONSE_HEADER = "=== Response {i} ({n} segment{s}) ==="
_RESPONSE_HEADER_RE = re.compile(r"^=== Response (\d+) \((\d+) segments?\) ===$", re.MULTILINE)
_ASPECT_LINE_RE = re.compile(r"^Aspect under review: (.+)$", re.MULTILINE)
_TURN_RE = re.compile(r"^\[(user|assistant|system)\]: ", re.MULTILINE)


class TemplateError(ValueError):
    """A template file is missing, malformed, or lacks an aspect."""


@dataclass(frozen=True)
class AspectTemplate:
    name: str
    title: str
    rating_label: str
    summary: str
    rubric: tuple[tuple[int, str], ...]  # (rating, meaning), highest first
    rules: tuple[str, ...]


@dataclass(frozen=True)
class JudgeTemplates:
    version: str
    digest: str  # sha256 of the template files' bytes
    system: str
    repair: str
    aspects: Mapping[str, AspectTemplate]

    @property
    def id(self) -> str:
        """Version plus content digest: the identity used in cache keys."""
        return f"{self.version}-{self.digest[:12]}"

    def aspect(self, name: str) -> AspectTemplate:
        try:
            return self.aspects[name]
        except KeyError:
            raise TemplateError(
                f"templates {self.version}: no judge prompt for aspect {name!r} (have {sorted(self.aspects)})"
            ) from None


@functools.lru_cache(maxsize=8)
def load_templates(version: str = DEFAULT_VERSION) -> JudgeTemplates:
    """Load ``templates/<version>_{system,repair}.txt`` and ``<version>_aspects.json``."""
    root = resources.files("twodrl.annotation") / "templates"
    names = (f"{version}_system.txt", f"{version}_repair.txt", f"{version}_aspects.json")
    raw: dict[str, bytes] = {}
    for name in names:
        path = root / name
        if not path.is_file():
            raise TemplateError(f"twodrl/annotation/templates/{name}: template file not found (version {version!r})")
        raw[name] = path.read_bytes()
    digest = hashlib.sha256(b"\0".join(raw[n] for n in names)).hexdigest()
    where = f"twodrl/annotation/templates/{names[2]}"
    try:
        spec = json.loads(raw[names[2]])
    except json.JSONDecodeError as e:
        raise TemplateError(f"{where}:{e.lineno}: invalid JSON: {e.msg}") from None
    aspects: dict[str, AspectTemplate] = {}
    for name, entry in spec.get("aspects", {}).items():
        if name not in ASPECTS:
            raise TemplateError(f"{where}: aspects.{name}: not a known aspect ({sorted(ASPECTS)})")
        try:
            rubric = tuple(sorted(((int(k), str(v)) for k, v in entry["rubric"].items()), reverse=True))
            aspects[name] = AspectTemplate(
                name=name,
                title=entry["title"],
                rating_label=entry["rating_label"],
                summary=entry["summary"],
                rubric=rubric,
                rules=tuple(entry.get("rules", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TemplateError(f"{where}: aspects.{name}: malformed entry ({type(e).__name__}: {e})") from None
        allowed = {r for r, _ in rubric}
        a = ASPECTS[name]
        expected = {a.low, a.high} if a.binary else set(range(a.low, a.high + 1))
        if allowed != expected:
            raise TemplateError(f"{where}: aspects.{name}.rubric: ratings {sorted(allowed)} != scale {sorted(expected)}")
    titles = [t.title for t in aspects.values()]
    if len(set(titles)) != len(titles):
        raise TemplateError(f"{where}: aspect titles must be distinct (the server identifies aspects by title)")
    return JudgeTemplates(
        version=version,
        digest=digest,
        system=raw[names[0]].decode("utf-8"),
        repair=raw[names[1]].decode("utf-8"),
        aspects=aspects,
    )


# ------------------------------------------------------------------------ building


def tag_segments(segments: Sequence[str]) -> str:
    """``<1>first</1> <2>second</2> …`` (ids from 1, as the judge is told)."""
    return " ".join(f"<{k}>{seg}</{k}>" for k, seg in enumerate(segments, start=1))


def reply_layout(aspect: AspectTemplate, n_responses: int, counts: Sequence[int] | None = None) -> str:
    """The answer layout shown to the judge (and in repair requests)."""
    lines: list[str] = []
    for i in range(1, n_responses + 1):
        lines.append(f"Response {i} Evaluation:")
        lines.append("<1> Evaluation: [remark]")
        lines.append(f"{aspect.rating_label}: n")
        lines.append("<2> Evaluation: [remark]")
        lines.append(f"{aspect.rating_label}: n")
        what = f"all {counts[i - 1]} segments" if counts else "every segment"
        lines.append(f"... (the same two lines for {what} of Response {i})")
    return "\n".join(lines)


def _system_message(t: AspectTemplate, n_responses: int, templates: JudgeTemplates) -> str:
    if n_responses == 1:
        responses_intro = 'The reply to judge appears under "Response 1".'
        reply_word, verb_suffix, every = "reply", "s", "the reply"
    else:
        responses_intro = (
            f"The {n_responses} replies to judge appear under \"Response 1\" … \"Response {n_responses}\"; "
            "they answer the same request independently, so rate each on its own merits."
        )
        reply_word, verb_suffix, every = "replies", "", "every reply"
    rubric = "\n".join(f"{r} - {text}" for r, text in t.rubric)
    rules = "".join(f"\n{rule}\n" for rule in t.rules)
    return templates.system.format(
        aspect_title=t.title,
        aspect_summary=t.summary,
        reply_word=reply_word,
        verb_suffix=verb_suffix,
        responses_intro=responses_intro,
        every_reply=every,
        rubric=rubric,
        rules=rules,
        layout=reply_layout(t, n_responses),
    ).strip()


def _history_text(history: Sequence[Mapping[str, Any]] | None) -> str:
    if not history:
        return NO_HISTORY
    turns = []
    for j, turn in enumerate(history):
        role = str(turn.get("role", "")).lower()
        if role not in ("user", "assistant", "system"):
            raise ValueError(f"history[{j}].role: expected user/assistant/system, got {turn.get('role')!r}")
        turns.append(f"[{role}]: {turn.get('content', '')}")
    return "\n".join(turns)


def build_messages(
    aspect: str,
    prompt: str,
    responses: Sequence[Sequence[str]],
    history: Sequence[Mapping[str, Any]] | None = None,
    templates: JudgeTemplates | None = None,
) -> list[dict[str, str]]:
    """Chat messages asking the judge to rate every segment of 1 or 2 ``responses``
    (each a list of segment strings) on ``aspect``."""
    templates = templates or load_templates()
    if not 1 <= len(responses) <= 2:
        raise ValueError(f"a judge request covers 1 or 2 responses, got {len(responses)}")
    for i, segs in enumerate(responses, start=1):
        if not segs:
            raise ValueError(f"response {i} has no segments to rate")
    t = templates.aspect(aspect)
    parts = [HISTORY_MARK, _history_text(history), "", REQUEST_MARK, prompt, ""]
    for i, segs in enumerate(responses, start=1):
        n = len(segs)
        parts.append(_RESPONSE_HEADER.format(i=i, n=n, s="" if n == 1 else "s"))
        parts.append(tag_segments(segs))
        parts.append("")
    return [
        {"role": "system", "content": _system_message(t, len(responses), templates)},
        {"role": "user", "content": "\n".join(parts).rstrip("\n")},
    ]


def repair_messages(
    messages: Sequence[Mapping[str, str]],
    bad_reply: str,
    problem: str,
    aspect: str,
    counts: Sequence[int],
    templates: JudgeTemplates | None = None,
) -> list[dict[str, str]]:
    """The conversation re-asked once after a malformed reply: the original request, the
    judge's unusable answer, and an instruction naming what was wrong."""
    templates = templates or load_templates()
    t = templates.aspect(aspect)
    count_text = " ".join(f"Response {i} has exactly {n} segment{'s' if n != 1 else ''} (<1> … <{n}>)." for i, n in enumerate(counts, 1))
    a = ASPECTS[aspect]
    scale_note = f" ({a.high} or {a.low} only)" if a.binary else f" (whole numbers {a.low} to {a.high})"
    text = templates.repair.format(
        problem=problem.rstrip("."),
        aspect_title=t.title,
        layout=reply_layout(t, len(counts), counts),
        counts=count_text,
        scale_note=scale_note,
    ).strip()
    return [dict(m) for m in messages] + [
        {"role": "assistant", "content": bad_reply},
        {"role": "user", "content": text},
    ]


# ------------------------------------------------------------------------ parsing back


@dataclass
class JudgeRequest:
    """What :func:`build_messages` encoded, recovered from the messages."""

    aspect: str
    prompt: str
    history: list[dict[str, str]]
    responses: list[list[str]]
    repair: bool  # the conversation is a repair round


def _parse_history(text: str) -> list[dict[str, str]]:
    if text.strip() == NO_HISTORY:
        return []
    starts = list(_TURN_RE.finditer(text))
    turns = []
    for j, m in enumerate(starts):
        end = starts[j + 1].start() if j + 1 < len(starts) else len(text)
        turns.append({"role": m.group(1), "content": text[m.end() : end].rstrip("\n")})
    return turns


def _parse_tagged(text: str, n: int) -> list[str]:
    segments = []
    pos = 0
    for k in range(1, n + 1):
        open_tag, close_tag = f"<{k}>", f"</{k}>"
        start = text.find(open_tag, pos)
        end = text.find(close_tag, start + len(open_tag)) if start >= 0 else -1
        if start < 0 or end < 0:
            raise ValueError(f"segment <{k}> not found")
        segments.append(text[start + len(open_tag) : end])
        pos = end + len(close_tag)
    return segments


def parse_request(messages: Sequence[Mapping[str, str]], templates: JudgeTemplates | None = None) -> JudgeRequest:
    """Inverse of :func:`build_messages` (also accepts a :func:`repair_messages`
    conversation). Raises ``ValueError`` if the messages are not in this frame."""
    templates = templates or load_templates()
    system = next((m.get("content", "") for m in messages if m.get("role") == "system"), None)
    user = next((m.get("content", "") for m in messages if m.get("role") == "user"), None)
    if system is None or user is None:
        raise ValueError("expected a system message and a user message")
    m = _ASPECT_LINE_RE.search(system)
    if not m:
        raise ValueError("system message names no aspect ('Aspect under review: …')")
    by_title = {t.title: name for name, t in templates.aspects.items()}
    title = m.group(1).strip()
    if title not in by_title:
        raise ValueError(f"unknown aspect title {title!r}")
    if not user.startswith(HISTORY_MARK + "\n"):
        raise ValueError("user message does not start with the history section")
    req_at = user.find("\n" + REQUEST_MARK + "\n")
    headers = list(_RESPONSE_HEADER_RE.finditer(user))
    if req_at < 0 or not headers:
        raise ValueError("user message lacks the request or response sections")
    # Sections are joined by one blank line ("\n\n"); slice exactly so that text
    # ending in newlines round-trips.
    history = _parse_history(user[len(HISTORY_MARK) + 1 : req_at - 1])
    prompt = user[req_at + len(REQUEST_MARK) + 2 : headers[0].start() - 2]
    responses = []
    for i, h in enumerate(headers):
        if int(h.group(1)) != i + 1:
            raise ValueError(f"response sections out of order at {h.group(0)!r}")
        end = headers[i + 1].start() if i + 1 < len(headers) else len(user)
        responses.append(_parse_tagged(user[h.end() + 1 : end], int(h.group(2))))
    return JudgeRequest(
        aspect=by_title[title],
        prompt=prompt,
        history=history,
        responses=responses,
        repair=sum(1 for x in messages if x.get("role") == "user") > 1,
    )
