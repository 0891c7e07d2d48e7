"""Converters to HelpSteer-2D records (twodrl.convert, ``twodrl convert``): HelpSteer2's
one-response-per-row layout, TRL's preference layout (plain and conversational,
explicit and implicit prompt), UltraFeedback binarized, and the native layout with its
segment check; property tests for the parsers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twodrl.aspects import HELPSTEER_ASPECTS
from twodrl.convert import (
    HELPSTEER2_PAIR_WEIGHTS, convert_rows, detect_format, load_preference_data, pair_helpsteer2_rows,
    parse_preference_row,
)
from twodrl.data import DataError, load_records, parse_record

text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60).filter(lambda s: s.strip())


def _rows(objs):
    return [(f"mem:{i + 1}", o) for i, o in enumerate(objs)]


def _write_jsonl(path: Path, objs) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


# ------------------------------------------------------------------ TRL preference


@settings(max_examples=60, deadline=None)
@given(prompt=text, chosen=text, rejected=text)
def test_plain_preference_row_is_one_segment_helpfulness_record(prompt, chosen, rejected):
    rec = parse_preference_row({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    assert rec.prompt == prompt and rec.chosen.text == chosen and rec.rejected.text == rejected
    assert rec.chosen.segments == [chosen.strip()] and rec.rejected.segments == [rejected.strip()]
    assert rec.chosen.scores == {"helpfulness": [4]} and rec.rejected.scores == {"helpfulness": [0]}
    # What it writes is a valid native record (segments concatenate back to the text).
    again = parse_record(json.loads(json.dumps(rec.to_json())), ("helpfulness",))
    assert again.chosen.segments == rec.chosen.segments


@settings(max_examples=40, deadline=None)
@given(system=text, first=text, answer=text, prompt=text, chosen=text, rejected=text)
def test_conversational_prompt_keeps_history(system, first, answer, prompt, chosen, rejected):
    row = {
        "prompt": [{"role": "system", "content": system}, {"role": "user", "content": first},
                   {"role": "assistant", "content": answer}, {"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }
    rec = parse_preference_row(row)
    assert rec.prompt == prompt
    assert [t["role"] for t in rec.history] == ["system", "user", "assistant"]
    assert rec.chosen.text == chosen and rec.rejected.text == rejected


def test_implicit_prompt_and_ultrafeedback_scores():
    conv = [{"role": "user", "content": "Name a bird."}]
    rec = parse_preference_row({"chosen": conv + [{"role": "assistant", "content": "A robin."}],
                                "rejected": conv + [{"role": "assistant", "content": "A cat."}]})
    assert rec.prompt == "Name a bird." and rec.history == []
    # UltraFeedback binarized: prompt string, full conversations, 1-10 scores.
    uf = {"prompt": "Name a bird.", "prompt_id": "x1",
          "chosen": conv + [{"role": "assistant", "content": "A robin."}],
          "rejected": conv + [{"role": "assistant", "content": "A cat."}],
          "score_chosen": 10.0, "score_rejected": 1.0}
    rec = parse_preference_row(uf)
    assert rec.chosen.scores == {"helpfulness": [4]} and rec.rejected.scores == {"helpfulness": [0]}
    assert rec.extra == {"prompt_id": "x1"}
    assert detect_format(uf) == "preference"
    with pytest.raises(DataError, match="score_chosen"):
        parse_preference_row({**uf, "score_chosen": 11})


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "a"}, "rejected is missing"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "chosen is empty"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "must end with an assistant"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "prompt is missing"),
])
def test_preference_errors_name_the_field(row, message):
    with pytest.raises(DataError, match=message):
        convert_rows(_rows([row]), "preference")


# ------------------------------------------------------------------ HelpSteer2


ratings = st.integers(0, 4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["p1", "p2", "p3"]), st.lists(ratings, min_size=5, max_size=5)),
                min_size=1, max_size=12))
def test_helpsteer2_pairs_best_against_worst(rows):
    objs = [{"prompt": p, "response": f"Answer {i} to {p}.", **dict(zip(HELPSTEER_ASPECTS, r))}
            for i, (p, r) in enumerate(rows)]
    records = pair_helpsteer2_rows(_rows(objs))

    def weight(resp):
        return sum(HELPSTEER2_PAIR_WEIGHTS[a] * resp.scores[a][0] for a in HELPSTEER_ASPECTS)

    by_prompt = {}
    for o in objs:
        by_prompt.setdefault(o["prompt"], []).append(sum(HELPSTEER2_PAIR_WEIGHTS[a] * o[a] for a in HELPSTEER_ASPECTS))
    expected = [p for p in dict.fromkeys(o["prompt"] for o in objs) if max(by_prompt[p]) != min(by_prompt[p])]
    assert [r.prompt for r in records] == expected
    for rec in records:
        assert weight(rec.chosen) == max(by_prompt[rec.prompt]) > weight(rec.rejected) == min(by_prompt[rec.prompt])
        assert rec.chosen.segments == [rec.chosen.text] and set(rec.chosen.scores) == set(HELPSTEER_ASPECTS)


def test_helpsteer2_rating_errors_name_the_row(tmp_path):
    path = _write_jsonl(tmp_path / "hs2.jsonl", [
        {"prompt": "p", "response": "a", **dict.fromkeys(HELPSTEER_ASPECTS, 2)},
        {"prompt": "p", "response": "b", **dict.fromkeys(HELPSTEER_ASPECTS, 2), "verbosity": 7},
    ])
    with pytest.raises(DataError, match=r"hs2.jsonl:2: verbosity must be an integer rating 0..4"):
        load_preference_data(path, "helpsteer2")


# ------------------------------------------------------------------ native / annotate + CLI


def test_native_record_whose_segments_do_not_rebuild_the_text_names_the_row(tmp_path):
    good = json.loads(Path("twodrl/data/helpsteer2d_sample.jsonl").read_text().splitlines()[0])
    bad = json.loads(json.dumps(good))
    bad["rejected"]["segments"][0] = "Something the response never says."
    path = _write_jsonl(tmp_path / "annotated.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"annotated.jsonl:2: rejected.segments do not match rejected.text"):
        load_preference_data(path, "annotate")
    assert len(load_preference_data(_write_jsonl(tmp_path / "one.jsonl", [good]), "auto").records) == 1


def test_convert_command_writes_loadable_records(tmp_path):
    from jobs.convert import main

    src = _write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": "Name a bird.", "chosen": "A robin.", "rejected": "A cat."},
        {"prompt": [{"role": "user", "content": "Name a fish."}], "chosen": [{"role": "assistant", "content": "A cod."}],
         "rejected": [{"role": "assistant", "content": "A dog."}]},
    ])
    out = tmp_path / "out.jsonl"
    assert main(["--from", "preference", str(src), str(out)]) == 0
    records = load_records(out, aspects=("helpfulness",)).records
    assert [r.prompt for r in records] == ["Name a bird.", "Name a fish."]
    assert main(["--from", "helpsteer2", str(src), str(tmp_path / "x.jsonl")]) == 1  # wrong layout: an error, no file
    assert not (tmp_path / "x.jsonl").exists()
