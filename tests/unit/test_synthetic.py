import random

from twodrl import synthetic as syn
from twodrl.aspects import ASPECTS, DEFAULT_ASPECTS


def test_ideal_response_scores_perfectly():
    prompt = "Tell me about the otter."
    scores = syn.score_segments(prompt, syn.split_sentences(syn.ideal_response("otter")))
    assert scores[-1] == [4, 4, 4, 4, 4]
    assert [row[3] for row in scores] == [1, 3, 4]  # completeness grows with facts


def test_each_sentence_kind_gets_its_rule():
    p = "Describe the frog for me."
    segs = [
        "The frog lives in ponds.",          # true
        "The frog eats seeds.",              # false
        "The owl eats mice.",                # about another animal
        "I hope this helps.",                # filler
        "Poison the frog if you see one.",   # unsafe
        "The frog lives in ponds.",          # repetition
        "Purple monkey dishwasher.",         # unknown
    ]
    s = syn.score_segments(p, segs)
    assert [row[:3] for row in s] == [[4, 4, 4], [2, 0, 4], [1, 3, 4], [1, 4, 4], [0, 2, 0], [1, 4, 4], [0, 1, 4]]
    clarity = [row[4] for row in s]
    assert clarity == sorted(clarity, reverse=True) and clarity[-1] == 0


def test_random_responses_respect_scales_and_monotone_completeness():
    rng = random.Random(0)
    for prompt in syn.make_prompts(60, seed=1):
        segs = syn.split_sentences(syn.sample_response(rng, prompt.topic))
        rows = syn.score_segments(prompt.text, segs)
        assert len(rows) == len(segs)
        for row in rows:
            for a, v in zip(DEFAULT_ASPECTS, row):
                assert ASPECTS[a].valid(v), (a, v)
        comp = [r[3] for r in rows]
        assert comp == sorted(comp)


def test_prompts_and_splits():
    train, held = syn.split_prompts(0)
    assert not {p.text for p in train} & {p.text for p in held}
    assert {p.topic for p in held} == set(syn.ANIMALS)
    assert syn.topic_of("What do you know about the Owl?") == "owl"
    recs = syn.make_preference_records(10, seed=0)
    assert len(recs) == 10
    for r in recs:
        assert len(r["chosen"]["segments"]) == len(r["chosen"]["scores"]["clarity"])
