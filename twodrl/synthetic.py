"""The embedded default task: a world a tiny model can learn in minutes on a CPU.

Prompts ask about an animal ("Tell me about the otter."). A response is a sequence of
short sentences, each one of a few kinds: a true fact about the animal, a false fact
about it, a true fact about a *different* animal, filler, an unsafe remark, or a
repetition of an earlier sentence. Rules rate every sentence on the five aspects, so
that segment-level credit matters: a response can contain good and bad sentences, and
completeness / clarity depend on what came before.

The same rules are used everywhere a label is needed: the local judge server answers
with them, the reward model learns them, the driver's quickstart is scored by them.

Rules per segment k (0-based), aspects on the 0–4 scale:

==============  ============  ============  ========  ===============================
kind            helpfulness   correctness   safety    notes
==============  ============  ============  ========  ===============================
true fact       4             4             4         new fact → completeness grows
false fact      2             0             4
other animal    1             3             4         true, but about something else
filler          1             4             4         clarity −1
unsafe          0             2             0
repetition      1             (as first)    4         clarity −1
unknown text    0             1             4         clarity −1
==============  ============  ============  ========  ===============================

completeness_k = round(4 · min(distinct true facts so far, REQUIRED_FACTS) / REQUIRED_FACTS)
(monotone by construction); clarity_k = 4 − (fillers + repetitions + unknown so far)
− max(0, k + 1 − CONCISE_LENGTH), clamped to [0, 4].
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from twodrl.aspects import DEFAULT_ASPECTS, DEFAULT_WEIGHTS
from twodrl.segmentation import stripped_segments

REQUIRED_FACTS = 3  # distinct true facts that make a response complete
CONCISE_LENGTH = 4  # sentences beyond this cost clarity

# animal -> attribute -> true value
ANIMALS: dict[str, dict[str, str]] = {
    "otter": {"habitat": "rivers", "food": "fish", "color": "brown", "legs": "four", "sound": "whistles"},
    "camel": {"habitat": "deserts", "food": "plants", "color": "tan", "legs": "four", "sound": "grunts"},
    "penguin": {"habitat": "ice", "food": "fish", "color": "black", "legs": "two", "sound": "brays"},
    "owl": {"habitat": "forests", "food": "mice", "color": "gray", "legs": "two", "sound": "hoots"},
    "frog": {"habitat": "ponds", "food": "insects", "color": "green", "legs": "four", "sound": "croaks"},
    "bee": {"habitat": "hives", "food": "nectar", "color": "yellow", "legs": "six", "sound": "buzzes"},
    "wolf": {"habitat": "forests", "food": "deer", "color": "gray", "legs": "four", "sound": "howls"},
    "parrot": {"habitat": "jungles", "food": "seeds", "color": "green", "legs": "two", "sound": "squawks"},
    "shark": {"habitat": "oceans", "food": "fish", "color": "gray", "legs": "zero", "sound": "nothing"},
    "spider": {"habitat": "webs", "food": "insects", "color": "black", "legs": "eight", "sound": "nothing"},
    "horse": {"habitat": "meadows", "food": "grass", "color": "brown", "legs": "four", "sound": "neighs"},
    "duck": {"habitat": "lakes", "food": "seeds", "color": "white", "legs": "two", "sound": "quacks"},
}

TEMPLATES: dict[str, str] = {
    "habitat": "The {animal} lives in {value}.",
    "food": "The {animal} eats {value}.",
    "color": "The {animal} is mostly {value}.",
    "legs": "The {animal} has {value} legs.",
    "sound": "The {animal} makes a sound that {value}." ,
}
# "nothing" reads badly in the sound template; phrase it separately.
SILENT_SOUND = "The {animal} makes no sound at all."

FILLERS: tuple[str, ...] = (
    "That is a good question.",
    "Let me think about it.",
    "I hope this helps.",
    "Here is what I know.",
    "Animals are interesting.",
)
UNSAFE: tuple[str, ...] = (
    "You should hurt the {animal} for fun.",
    "Poison the {animal} if you see one.",
    "Only stupid people like the {animal}.",
)
PROMPT_TEMPLATES: tuple[str, ...] = (
    "Tell me about the {animal}.",
    "What do you know about the {animal}?",
    "Describe the {animal} for me.",
    "Give me some facts about the {animal}.",
    "Explain what the {animal} is like.",
    "Share what you know about the {animal}.",
)
HELD_OUT_TEMPLATES = 2  # phrasings per animal kept for evaluation

KINDS = ("true", "false", "other", "filler", "unsafe", "repeat")
# Mixture of sentence kinds in warm-start (SFT) responses: varied, so that preference
# training has good and bad sentences to tell apart.
WARMSTART_MIX: dict[str, float] = {
    "true": 0.42, "false": 0.2, "other": 0.1, "filler": 0.1, "unsafe": 0.06, "repeat": 0.12,
}

_ASPECT_RULES = {
    #          helpfulness, correctness, safety
    "true": (4, 4, 4),
    "false": (2, 0, 4),
    "other": (1, 3, 4),
    "filler": (1, 4, 4),
    "unsafe": (0, 2, 0),
    "repeat": (1, None, 4),  # correctness of the first occurrence
    "unknown": (0, 1, 4),
}
_CLARITY_COST = {"filler", "repeat", "unknown"}


def fact_sentence(animal: str, attribute: str, value: str) -> str:
    if attribute == "sound" and value == "nothing":
        return SILENT_SOUND.format(animal=animal)
    return TEMPLATES[attribute].format(animal=animal, value=value)


def _values(attribute: str) -> list[str]:
    return sorted({facts[attribute] for facts in ANIMALS.values()})


def _norm(sentence: str) -> str:
    return re.sub(r"\s+", " ", sentence.strip().lower()).rstrip(".!?")


def _build_index() -> dict[str, tuple[str, str | None, bool]]:
    """normalised sentence -> (kind, animal it is about, is true)."""
    index: dict[str, tuple[str, str | None, bool]] = {}
    for animal, facts in ANIMALS.items():
        for attribute, true_value in facts.items():
            for value in _values(attribute):
                index[_norm(fact_sentence(animal, attribute, value))] = ("fact", animal, value == true_value)
        for template in UNSAFE:
            index[_norm(template.format(animal=animal))] = ("unsafe", animal, False)
    for filler in FILLERS:
        index[_norm(filler)] = ("filler", None, True)
    return index


_INDEX = _build_index()
_ANIMAL_RE = re.compile(r"\b(" + "|".join(sorted(ANIMALS, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def topic_of(prompt: str) -> str | None:
    """The animal a prompt asks about (the last one named), or None."""
    found = _ANIMAL_RE.findall(prompt)
    return found[-1].lower() if found else None


def classify(topic: str | None, sentence: str, seen: Iterable[str] = ()) -> str:
    """The kind of a sentence for a prompt about ``topic``, given earlier sentences."""
    key = _norm(sentence)
    if key in {_norm(s) for s in seen}:
        return "repeat"
    entry = _INDEX.get(key)
    if entry is None:
        return "unknown"
    kind, animal, is_true = entry
    if kind != "fact":
        return kind
    if animal != topic:
        return "other" if is_true else "false"
    return "true" if is_true else "false"


def score_segments(
    prompt: str, segments: Sequence[str], aspects: Sequence[str] = DEFAULT_ASPECTS
) -> list[list[int]]:
    """Rule-based ``[S][A]`` ratings of a segmented response (see module docstring).

    Supports the five default aspects plus ``verbosity`` (DPA: grows with length) and
    ``coherence`` (same rule as clarity).
    """
    topic = topic_of(prompt)
    rows: list[list[int]] = []
    seen: list[str] = []
    first_correctness: dict[str, int] = {}
    facts_so_far: set[str] = set()
    clarity_cost = 0
    for k, sentence in enumerate(segments):
        kind = classify(topic, sentence, seen)
        helpful, correct, safe = _ASPECT_RULES[kind]
        key = _norm(sentence)
        if kind == "repeat":
            correct = first_correctness.get(key, 1)
        else:
            first_correctness[key] = correct
        if kind == "true":
            facts_so_far.add(key)
        if kind in _CLARITY_COST:
            clarity_cost += 1
        seen.append(sentence)
        completeness = round(4 * min(len(facts_so_far), REQUIRED_FACTS) / REQUIRED_FACTS)
        clarity = max(0, min(4, 4 - clarity_cost - max(0, k + 1 - CONCISE_LENGTH)))
        values = {
            "helpfulness": helpful,
            "correctness": correct,
            "safety": safe,
            "completeness": completeness,
            "clarity": clarity,
            "coherence": clarity,
            "verbosity": min(4, k),
        }
        try:
            rows.append([values[a] for a in aspects])
        except KeyError as e:
            raise KeyError(f"the synthetic task has no rule for aspect {e.args[0]!r}") from None
    return rows


# ---------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Prompt:
    text: str
    topic: str


def make_prompts(n: int, seed: int = 0, animals: Sequence[str] | None = None) -> list[Prompt]:
    """``n`` prompts, cycling through animals and phrasings in a seeded order."""
    rng = random.Random(seed)
    pool = [
        Prompt(t.format(animal=a), a) for a in (animals or sorted(ANIMALS)) for t in PROMPT_TEMPLATES
    ]
    out: list[Prompt] = []
    while len(out) < n:
        batch = pool[:]
        rng.shuffle(batch)
        out.extend(batch)
    return out[:n]


def split_prompts(seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """Disjoint train / held-out prompt pools: the held-out pool asks about every
    animal in ``HELD_OUT_TEMPLATES`` phrasings the policy never trains on."""
    n = len(PROMPT_TEMPLATES)
    held_templates = {PROMPT_TEMPLATES[(seed + k) % n] for k in range(HELD_OUT_TEMPLATES)}
    train, held = [], []
    for a in sorted(ANIMALS):
        for t in PROMPT_TEMPLATES:
            (held if t in held_templates else train).append(Prompt(t.format(animal=a), a))
    return train, held


def sample_sentence(rng: random.Random, topic: str, kind: str, earlier: Sequence[str]) -> str:
    if kind == "repeat" and earlier:
        return rng.choice(list(earlier))
    if kind in ("true", "repeat"):
        attribute = rng.choice(sorted(ANIMALS[topic]))
        return fact_sentence(topic, attribute, ANIMALS[topic][attribute])
    if kind == "false":
        attribute = rng.choice(sorted(ANIMALS[topic]))
        wrong = [v for v in _values(attribute) if v != ANIMALS[topic][attribute]]
        return fact_sentence(topic, attribute, rng.choice(wrong))
    if kind == "other":
        other = rng.choice([a for a in sorted(ANIMALS) if a != topic])
        attribute = rng.choice(sorted(ANIMALS[other]))
        return fact_sentence(other, attribute, ANIMALS[other][attribute])
    if kind == "filler":
        return rng.choice(FILLERS)
    if kind == "unsafe":
        return rng.choice(UNSAFE).format(animal=topic)
    raise ValueError(f"unknown sentence kind {kind!r}")


def sample_response(
    rng: random.Random,
    topic: str,
    mix: dict[str, float] | None = None,
    min_sentences: int = 2,
    max_sentences: int = 6,
) -> str:
    """A response of mixed-quality sentences (the warm-start distribution)."""
    mix = mix or WARMSTART_MIX
    kinds, probs = zip(*mix.items())
    sentences: list[str] = []
    for _ in range(rng.randint(min_sentences, max_sentences)):
        kind = rng.choices(kinds, probs)[0]
        sentences.append(sample_sentence(rng, topic, kind, sentences))
    return " ".join(sentences)


def ideal_response(topic: str, n_facts: int = REQUIRED_FACTS) -> str:
    facts = ANIMALS[topic]
    return " ".join(fact_sentence(topic, a, facts[a]) for a in sorted(facts)[:n_facts])


def split_sentences(response: str) -> list[str]:
    """How this task's responses split into segments (one sentence each): the general
    segmenter, so that the task, the judge and real data share one segmentation."""
    return stripped_segments(response)


def make_preference_records(
    n: int,
    seed: int = 0,
    samples_per_prompt: int = 4,
    aspects: Sequence[str] = DEFAULT_ASPECTS,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
) -> list[dict]:
    """``n`` HelpSteer-2D records labelled by the rules: for each prompt, sample K
    warm-start responses, keep the best and the worst by weighted representative score
    (ties broken by sample order); prompts whose samples all tie are skipped."""
    from twodrl.aspects import weighted_score

    rng = random.Random(seed)
    prompts = make_prompts(max(n * 2, 1), seed=seed)
    records: list[dict] = []
    for p in prompts:
        if len(records) >= n:
            break
        scored = []
        for _ in range(samples_per_prompt):
            text = sample_response(rng, p.topic)
            segments = split_sentences(text)
            scores = score_segments(p.text, segments, aspects)
            import torch

            scored.append((weighted_score(torch.tensor(scores, dtype=torch.float64), weights, aspects), text, segments, scores))
        best = max(scored, key=lambda s: s[0])
        worst = min(scored, key=lambda s: s[0])
        if best[0] == worst[0]:
            continue

        def side(entry):
            _, text, segments, scores = entry
            return {"text": text, "segments": segments, "scores": {a: [row[j] for row in scores] for j, a in enumerate(aspects)}}

        records.append({"prompt": p.text, "chosen": side(best), "rejected": side(worst)})
    return records


def corpus() -> Iterator[str]:
    """Every string the task can produce: prompts, sentences, fillers (tokenizer training)."""
    for a in sorted(ANIMALS):
        for t in PROMPT_TEMPLATES:
            yield t.format(animal=a)
        for attribute in sorted(ANIMALS[a]):
            for value in _values(attribute):
                yield fact_sentence(a, attribute, value)
        for u in UNSAFE:
            yield u.format(animal=a)
    yield from FILLERS
