"""Rule-based ratings for arbitrary English text: the local judge's ``generic`` mode.

This is a STAND-IN, not a quality judge. It lets the whole annotation path (prompt
building, HTTP, parsing, caching, reward-model training) run end to end on real
prompts without an LLM judge, with ratings that are deterministic, cheap and at least
loosely related to the text. It knows nothing about truth: a fluent, confident, on-topic
falsehood gets top marks. Never report its ratings as a measure of model quality.

Every rule works on surface features of one segment, read in the light of the prompt
(plus the user turns of the conversation history) and of the segments before it.
Words are lower-cased, reduced by a crude suffix stripper and filtered by a stop-word
list; what is left are *content words*. Aspects use the 0–4 scale:

helpfulness
    0 for empty/garbled or unsafe segments; 1 for filler ("I hope this helps.") and
    repetitions; otherwise ``1 + min(2, content words shared with the prompt)
    + 1 if the segment has at least SUBSTANTIAL_WORDS words``, minus 1 for segments
    under SHORT_WORDS words. A prompt with no content words at all ("Go on.") gives
    every non-filler segment one point of overlap credit, since nothing can match.
correctness
    4 minus one per distinct hedge ("maybe", "I think", "not sure", ...); a repetition
    gets the rating of its first occurrence minus 1; an empty or garbled segment gets 1.
safety
    0 if the segment contains a word from a short list of harm words (kill, poison,
    weapon, hurt, ...), else 4. Whole-word matching only, so "skill" is fine, but
    "kill the process" fails: this is a keyword list, not an understanding of harm.
completeness
    ``round(4 · min(covered, need) / need)``: ``covered`` counts the distinct prompt
    content words mentioned by the (safe) segments so far and ``need`` is
    min(COVERAGE_TARGET, prompt content words). Without prompt content words the count
    is of substantive segments instead. A running maximum keeps it non-decreasing.
clarity (and coherence, same rule)
    4 minus the segment's own problems: a long sentence (> LONG_SENTENCE_WORDS words,
    2 points past VERY_LONG_SENTENCE_WORDS), a repetition of an earlier segment
    (2 points), garbled text (mostly non-letters, vowel-less or absurdly long tokens:
    2 points), filler (1 point), and 1 point once the reply runs past
    LONG_REPLY_SEGMENTS segments.
verbosity
    grows with the words written so far: ``min(4, words so far // WORDS_PER_VERBOSITY)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from twodrl.aspects import DEFAULT_ASPECTS

SUPPORTED_ASPECTS: tuple[str, ...] = (
    "helpfulness", "correctness", "safety", "completeness", "clarity", "coherence", "verbosity",
)

SUBSTANTIAL_WORDS = 6  # a segment this long has some substance
SHORT_WORDS = 3  # fewer words than this: too short to help much
LONG_SENTENCE_WORDS = 40
VERY_LONG_SENTENCE_WORDS = 70
LONG_REPLY_SEGMENTS = 12  # segments beyond this are taken as padding
COVERAGE_TARGET = 3  # prompt content words a reply must touch to count as complete
WORDS_PER_VERBOSITY = 25
# Below this share of letters among visible characters a segment reads as noise; low
# enough that a sentence with a few numbers ("3 x 4 = 12 apples") passes.
GARBLED_LETTER_SHARE = 0.4
GARBLED_TOKEN_CHARS = 30

# Words that carry no topic: function words and the verbs people use to ask for things.
STOP_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before
being below between both but by can could did do does doing done down during each either
else even ever every few for from further get gets give had has have having he her here
hers herself him himself his how i if in into is it its itself just know let like make me
might more most much must my myself need no nor not now of off on once only or other our
ours out over own please quite rather really said same say see she should show so some
such tell than that the their theirs them then there these they thing things this those
through to too under until up us very want was way we well were what when where which
while who whom why will with within without would yes yet you your yours yourself explain
describe help tips idea ideas good best better lot lots many one two three don't
doesn't isn't aren't can't won't it's i'm i've you're that's there's what's let's
""".split())

# Phrases that fill space without informing. Matched on normalised text.
FILLER_PHRASES: tuple[str, ...] = (
    "good question", "great question", "hope this helps", "hope that helps", "let me think",
    "here is what", "here's what", "happy to help", "glad to help", "of course", "sure thing",
    "let me know if", "feel free to ask", "i can help with that", "as an ai",
)

HEDGES: tuple[str, ...] = (
    "maybe", "perhaps", "i think", "not sure", "probably", "possibly", "i guess", "i believe",
    "as far as i know", "if i remember", "not certain", "i suppose", "it seems",
)

# Whole words that fail safety, in any inflection. Deliberately short and blunt.
UNSAFE_WORDS: tuple[str, ...] = (
    "kill", "murder", "poison", "weapon", "bomb", "explosive", "hurt", "stab", "suicide",
    "steal", "abuse", "torture", "stupid", "idiot",
)

_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")
_SPACE_RE = re.compile(r"\s+")
_PHRASE_SEPARATOR_RE = re.compile(r"[^a-z0-9']+")
_VOWELS = set("aeiouy")


def normalise(text: str) -> str:
    """Lower-case, collapse whitespace, drop trailing sentence punctuation."""
    return _SPACE_RE.sub(" ", text.strip().lower()).rstrip(".!?;:, ")


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def stem(word: str) -> str:
    """Crude suffix stripping so that "eggs"/"egg" and "boiling"/"boil" meet. Both
    sides of every comparison go through it, so its mistakes cancel out."""
    word = word.split("'")[0]
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and not word.endswith("ss") and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    if word.endswith("e") and len(word) > 3:
        word = word[:-1]
    return word


def content_words(text: str) -> frozenset[str]:
    return frozenset(stem(w) for w in words(text) if w not in STOP_WORDS and len(w) > 2)


_UNSAFE_STEMS = frozenset(stem(w) for w in UNSAFE_WORDS)


def unsafe_words(text: str) -> tuple[str, ...]:
    """The harm words in ``text`` (as written), sorted and without duplicates."""
    return tuple(sorted({w for w in words(text) if stem(w) in _UNSAFE_STEMS}))


def _has_phrase(norm_text: str, phrases: Sequence[str]) -> list[str]:
    padded = " " + _PHRASE_SEPARATOR_RE.sub(" ", norm_text) + " "
    return [p for p in phrases if f" {p} " in padded]


def _is_garbled(text: str) -> bool:
    visible = [c for c in text if not c.isspace()]
    if not visible:
        return True
    letters = sum(c.isalpha() for c in visible)
    if letters / len(visible) < GARBLED_LETTER_SHARE:
        return True
    for token in text.split():
        if len(token) > GARBLED_TOKEN_CHARS:
            return True
        alpha = "".join(c for c in token if c.isalpha())
        # Acronyms ("HTTPS") are upper-case; a long lower-case run without vowels is noise.
        if len(alpha) >= 5 and alpha.islower() and not _VOWELS & set(alpha):
            return True
    return False


@dataclass(frozen=True)
class SegmentFeatures:
    """What the rules read off one segment (in the context of the ones before it)."""

    n_words: int
    overlap: int  # distinct prompt content words this segment mentions
    filler: bool
    garbled: bool
    repeat_of: int | None  # index of the earlier segment it repeats
    hedges: tuple[str, ...]
    unsafe: tuple[str, ...]
    covered: int  # distinct prompt content words covered up to here (or substantive segments)
    need: int
    words_so_far: int


def context_text(prompt: str, history: Sequence[Mapping[str, str]] = ()) -> str:
    """The prompt with the user turns before it: follow-ups ("and for dinner?") name
    their topic in earlier turns."""
    users = [str(t.get("content", "")) for t in history if t.get("role") == "user"]
    return " ".join(users + [prompt])


def analyse_segments(
    prompt: str, segments: Sequence[str], history: Sequence[Mapping[str, str]] = ()
) -> list[SegmentFeatures]:
    topic = content_words(context_text(prompt, history))
    need = min(COVERAGE_TARGET, len(topic)) if topic else COVERAGE_TARGET
    seen_text: dict[str, int] = {}
    seen_content: dict[frozenset[str], int] = {}
    covered: set[str] = set()
    substantive = 0
    words_so_far = 0
    out: list[SegmentFeatures] = []
    for k, segment in enumerate(segments):
        norm = normalise(segment)
        seg_words = words(segment)
        seg_content = content_words(segment)
        repeat_of = seen_text.get(norm) if norm else None
        # Same content words in another order is still saying the same thing again.
        if repeat_of is None and len(seg_content) >= 3:
            repeat_of = seen_content.get(seg_content)
        # A filler phrase inside a sentence with real content ("Of course, rinse the
        # rice first.") is not filler; words without any content word always are.
        filler = (bool(_has_phrase(norm, FILLER_PHRASES)) and len(seg_content) <= 3) or (
            bool(seg_words) and not seg_content
        )
        garbled = _is_garbled(segment)
        unsafe = unsafe_words(segment)
        if not unsafe:
            covered |= seg_content & topic
            if not (filler or garbled or repeat_of is not None):
                substantive += 1
        words_so_far += len(seg_words)
        out.append(SegmentFeatures(
            n_words=len(seg_words),
            overlap=len(seg_content & topic) if topic else int(not filler and bool(seg_content)),
            filler=filler,
            garbled=garbled,
            repeat_of=repeat_of,
            hedges=tuple(_has_phrase(norm, HEDGES)),
            unsafe=unsafe,
            covered=len(covered) if topic else substantive,
            need=need,
            words_so_far=words_so_far,
        ))
        seen_text.setdefault(norm, k)
        if seg_content:
            seen_content.setdefault(seg_content, k)
    return out


def _clamp(value: int) -> int:
    return max(0, min(4, value))


def _helpfulness(f: SegmentFeatures) -> int:
    if f.n_words == 0 or f.garbled or f.unsafe:
        return 0
    if f.filler or f.repeat_of is not None:
        return 1
    score = 1 + min(2, f.overlap) + (1 if f.n_words >= SUBSTANTIAL_WORDS else 0)
    if f.n_words < SHORT_WORDS:
        score -= 1
    return _clamp(score)


def _own_correctness(f: SegmentFeatures) -> int:
    if f.n_words == 0 or f.garbled:
        return 1  # nothing readable to be right about
    return _clamp(4 - len(f.hedges))


def _clarity(f: SegmentFeatures, k: int) -> int:
    cost = 0
    if f.n_words > VERY_LONG_SENTENCE_WORDS:
        cost += 2
    elif f.n_words > LONG_SENTENCE_WORDS:
        cost += 1
    if f.repeat_of is not None:
        cost += 2
    if f.garbled:
        cost += 2
    if f.filler:
        cost += 1
    if k >= LONG_REPLY_SEGMENTS:
        cost += 1
    return _clamp(4 - cost)


def score_segments_generic(
    prompt: str,
    segments: Sequence[str],
    aspects: Sequence[str] = DEFAULT_ASPECTS,
    history: Sequence[Mapping[str, str]] = (),
) -> list[list[int]]:
    """``[S][A]`` ratings (0–4; safety 0 or 4) of ``segments`` for ``prompt`` by the
    rules in the module docstring. Raises ``KeyError`` for an aspect it has no rule for."""
    unknown = [a for a in aspects if a not in SUPPORTED_ASPECTS]
    if unknown:
        raise KeyError(f"the generic rules have no rule for aspect {unknown[0]!r} (have {list(SUPPORTED_ASPECTS)})")
    feats = analyse_segments(prompt, segments, history)
    correctness: list[int] = []
    rows: list[list[int]] = []
    best_completeness = 0
    for k, f in enumerate(feats):
        if f.repeat_of is not None:
            correctness.append(_clamp(correctness[f.repeat_of] - 1))
        else:
            correctness.append(_own_correctness(f))
        best_completeness = max(best_completeness, round(4 * min(f.covered, f.need) / f.need))
        clarity = _clarity(f, k)
        values = {
            "helpfulness": _helpfulness(f),
            "correctness": correctness[k],
            "safety": 0 if f.unsafe else 4,
            "completeness": best_completeness,
            "clarity": clarity,
            "coherence": clarity,
            "verbosity": min(4, f.words_so_far // WORDS_PER_VERBOSITY),
        }
        rows.append([values[a] for a in aspects])
    return rows


def _remark(f: SegmentFeatures, aspect: str, k: int) -> str:
    """One line that says which rule decided the rating (no newlines, no "Rating:")."""
    if aspect == "safety":
        return f"contains harm word(s): {', '.join(f.unsafe)}" if f.unsafe else "no harm words found"
    if f.n_words == 0:
        return "no words to judge"
    if aspect == "correctness":
        if f.repeat_of is not None:
            return f"repeats segment {f.repeat_of + 1}"
        return f"hedges: {', '.join(f.hedges)}" if f.hedges else "states things without hedging"
    if aspect == "completeness":
        return f"coverage {min(f.covered, f.need)} of {f.need} so far"
    if aspect == "verbosity":
        return f"{f.words_so_far} words so far"
    problems = []
    if f.unsafe and aspect == "helpfulness":
        problems.append("unsafe content")
    if f.garbled:
        problems.append("garbled text")
    if f.repeat_of is not None:
        problems.append(f"repeats segment {f.repeat_of + 1}")
    if f.filler:
        problems.append("filler")
    if aspect == "helpfulness":
        if problems:
            return "; ".join(problems)
        short = ", too short" if f.n_words < SHORT_WORDS else ""
        return f"{f.overlap} prompt word(s) addressed in {f.n_words} words{short}"
    if f.n_words > LONG_SENTENCE_WORDS:
        problems.append(f"long sentence ({f.n_words} words)")
    if k >= LONG_REPLY_SEGMENTS:
        problems.append("reply runs long")
    return "; ".join(problems) if problems else "clear and to the point"


def remarks_generic(
    prompt: str, segments: Sequence[str], aspect: str, history: Sequence[Mapping[str, str]] = ()
) -> list[str]:
    """A short, single-line reason per segment for its ``aspect`` rating."""
    if aspect not in SUPPORTED_ASPECTS:
        raise KeyError(f"the generic rules have no rule for aspect {aspect!r} (have {list(SUPPORTED_ASPECTS)})")
    return [_remark(f, aspect, k) for k, f in enumerate(analyse_segments(prompt, segments, history))]
