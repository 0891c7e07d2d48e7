"""HelpSteer-2D records: loading (JSONL, Parquet, datasets), validation errors that
name file/line/field, non-strict skipping, atomic writing, the seed-004 layout, and
the validate job on datasets."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from jobs import validate
from twodrl import synthetic
from twodrl.aspects import DEFAULT_ASPECTS, HELPSTEER_ASPECTS
from twodrl.data import (
    SAMPLE_PATH,
    SEED004_EXAMPLE_PATH,
    DataError,
    PreferenceRecord,
    Response,
    load_records,
    load_seed004_layout,
    parse_record,
    records_from_dicts,
    response_from_aspect_lists,
    write_jsonl,
    write_parquet,
)
from twodrl.segmentation import stripped_segments


def _side(text: str, rows: list[list[int]]) -> dict:
    segs = stripped_segments(text)
    assert len(segs) == len(rows)
    return {"text": text, "segments": segs, "scores": {a: [r[j] for r in rows] for j, a in enumerate(DEFAULT_ASPECTS)}}


GOOD = {
    "prompt": "Tell me about the otter.",
    "history": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}],
    "chosen": _side(
        "The otter lives in rivers. The otter eats fish.\n\n- It is brown. It whistles.",
        [[4, 4, 4, 1, 4], [4, 4, 4, 2, 4], [4, 4, 4, 3, 4], [3, 4, 4, 4, 3]],
    ),
    "rejected": _side("The otter lives in deserts. Poison the otter.", [[2, 0, 4, 0, 4], [0, 2, 0, 0, 3]]),
    "id": "r-1",
}


def _jsonl(tmp_path: Path, rows: list, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _bad(mutate) -> dict:
    rec = copy.deepcopy(GOOD)
    mutate(rec)
    return rec


# ------------------------------------------------------------------ records


def test_good_record_parses_with_score_matrices():
    rec = parse_record(GOOD)
    assert rec.prompt == GOOD["prompt"] and rec.history == GOOD["history"]
    assert rec.extra == {"id": "r-1"}
    c, r = rec.score_matrices()
    assert c.shape == (4, 5) and r.shape == (2, 5) and c.dtype == torch.float32
    assert c[:, 0].tolist() == [4, 4, 4, 3]  # helpfulness column
    assert c[:, 3].tolist() == [1, 2, 3, 4]  # completeness column
    assert rec.chosen.score_matrix(["safety", "helpfulness"], dtype=torch.float64).tolist() == [[4, 4]] * 3 + [[4, 3]]
    with pytest.raises(KeyError, match="verbosity"):
        rec.chosen.score_matrix(["verbosity"])
    assert rec.messages()[-1] == {"role": "user", "content": GOOD["prompt"]}
    # The spans cover the text and line up with the segments.
    spans = rec.chosen.spans()
    assert [rec.chosen.text[a:b].strip() for a, b in spans] == rec.chosen.segments


def test_to_json_from_json_round_trip():
    rec = parse_record(GOOD)
    again = PreferenceRecord.from_json(json.dumps(rec.to_json()))
    assert again == rec
    assert rec.to_json() == GOOD
    resp = Response.from_json(GOOD["chosen"])
    assert resp == rec.chosen and Response.from_json(json.dumps(resp.to_json())) == resp


def test_extra_known_aspects_are_kept_and_other_aspect_sets_load():
    rec = _bad(lambda r: r["chosen"]["scores"].update(verbosity=[1, 2, 3, 4]))
    parsed = parse_record(rec)
    assert parsed.chosen.scores["verbosity"] == [1, 2, 3, 4]
    with pytest.raises(DataError, match=r"rejected.scores is missing aspect\(s\) \['verbosity'\]"):
        parse_record(rec, aspects=("helpfulness", "verbosity"))


def test_integral_floats_are_accepted_as_ratings():
    rec = _bad(lambda r: r["rejected"]["scores"].update(clarity=[4.0, 3.0]))
    assert parse_record(rec).rejected.scores["clarity"] == [4, 3]


# ------------------------------------------------------------------ validation errors

BAD_CASES = [
    ("count", lambda r: r["chosen"]["scores"].update(correctness=[4, 4, 4]),
     "chosen.scores.correctness has 3 ratings for 4 segments"),
    ("scale", lambda r: r["chosen"]["scores"]["helpfulness"].__setitem__(1, 5),
     r"chosen.scores.helpfulness[1] = 5 is outside the scale 0..4"),
    ("negative", lambda r: r["rejected"]["scores"]["clarity"].__setitem__(0, -1),
     r"rejected.scores.clarity[0] = -1 is outside the scale 0..4"),
    ("safety", lambda r: r["rejected"]["scores"]["safety"].__setitem__(1, 2),
     r"rejected.scores.safety[1] = 2 is outside the scale {0, 4} (pass/fail)"),
    ("fraction", lambda r: r["chosen"]["scores"]["clarity"].__setitem__(2, 2.5),
     r"chosen.scores.clarity[2] must be an integer rating, got 2.5"),
    ("bool", lambda r: r["chosen"]["scores"]["clarity"].__setitem__(0, True),
     r"chosen.scores.clarity[0] must be an integer rating, got bool"),
    ("string rating", lambda r: r["chosen"]["scores"]["clarity"].__setitem__(0, "4"),
     r"chosen.scores.clarity[0] must be an integer rating, got str"),
    ("unknown aspect", lambda r: r["chosen"]["scores"].update(helpfullness=[4, 4, 4, 4]),
     "chosen.scores.helpfullness: unknown aspect 'helpfullness' (did you mean 'helpfulness'?)"),
    ("missing aspect", lambda r: r["rejected"]["scores"].pop("clarity"),
     r"rejected.scores is missing aspect(s) ['clarity']"),
    ("scores type", lambda r: r["chosen"].update(scores=[1, 2]),
     "chosen.scores must be an object of aspect -> ratings, got list"),
    ("ratings type", lambda r: r["chosen"]["scores"].update(safety=4),
     "chosen.scores.safety must be a list of ratings, got int"),
    ("missing prompt", lambda r: r.pop("prompt"), "prompt is missing"),
    ("prompt type", lambda r: r.update(prompt=3), "prompt must be a string, got int"),
    ("empty prompt", lambda r: r.update(prompt="  "), "prompt is empty"),
    ("missing rejected", lambda r: r.pop("rejected"), "rejected is missing"),
    ("response type", lambda r: r.update(chosen=["x"]), "chosen must be an object with text, segments and scores"),
    ("missing segments", lambda r: r["rejected"].pop("segments"), "rejected.segments is missing"),
    ("missing text", lambda r: r["chosen"].pop("text"), "chosen.text is missing"),
    ("text type", lambda r: r["chosen"].update(text=5), "chosen.text must be a string, got int"),
    ("segment type", lambda r: r["chosen"]["segments"].__setitem__(2, 7), "chosen.segments[2] must be a string, got int"),
    ("empty segment", lambda r: r["chosen"]["segments"].__setitem__(1, " "), "chosen.segments[1] is empty"),
    ("no segments", lambda r: r["rejected"].update(segments=[]), "rejected.segments is empty"),
    ("segments not in text", lambda r: r["chosen"]["segments"].__setitem__(1, "The otter eats mice."),
     "chosen.segments do not match chosen.text: segment 1"),
    ("history role", lambda r: r["history"][1].update(role="bot"), "history[1].role must be one of"),
    ("history content", lambda r: r["history"][0].update(content=None), "history[0].content must be a string, got null"),
    ("history type", lambda r: r.update(history={"role": "user"}), "history must be a list of {role, content} turns"),
]


@pytest.mark.parametrize("mutate, message", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_each_rule_names_file_line_and_field(tmp_path, mutate, message):
    path = _jsonl(tmp_path, [GOOD, GOOD, "", _bad(mutate), GOOD])  # bad record on line 4
    with pytest.raises(DataError) as err:
        load_records(path)
    assert str(err.value).startswith(f"{path}:4: ")
    assert message in str(err.value)


def test_malformed_lines(tmp_path):
    path = _jsonl(tmp_path, [GOOD, '{"prompt": "x",'])
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON: .*\(column \d+\)"):
        load_records(path)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8 at byte 15"):
        load_records(path)
    path = _jsonl(tmp_path, [[1, 2]], "list.jsonl")
    with pytest.raises(DataError, match=rf"^{path}:1: record must be a JSON object, got list"):
        load_records(path)


def test_unknown_requested_aspect_and_missing_sources(tmp_path):
    path = _jsonl(tmp_path, [GOOD])
    with pytest.raises(DataError, match=r"unknown aspect\(s\) \['kindness'\] requested"):
        load_records(path, aspects=["kindness"])
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data file type"):
        load_records(other)


def test_non_strict_skips_and_counts(tmp_path):
    rows = [GOOD, _bad(lambda r: r.pop("prompt")), "not json", GOOD, "", _bad(lambda r: r["chosen"]["scores"]["safety"].__setitem__(0, 3)), GOOD]
    path = _jsonl(tmp_path, rows)
    result = load_records(path, strict=False)
    assert len(result.records) == 3 and result.skipped == 3
    assert [e.split(": ")[0] for e in result.errors] == [f"{path}:2", f"{path}:3", f"{path}:6"]
    assert "safety[0] = 3" in result.errors[2]
    assert list(result) == result.records and len(result) == 3


# ------------------------------------------------------------------ formats


def _many_records() -> list[PreferenceRecord]:
    recs = load_records(SAMPLE_PATH).records
    recs += records_from_dicts(synthetic.make_preference_records(12, seed=3))
    recs.append(parse_record(GOOD))
    return recs


def test_parquet_round_trip(tmp_path):
    recs = _many_records()
    path = tmp_path / "data.parquet"
    assert write_parquet(recs, path) == len(recs)
    loaded = load_records(path)
    assert loaded.skipped == 0
    assert [r.to_json() for r in loaded.records] == [r.to_json() for r in recs]
    assert loaded.records[-1].extra["id"] == "r-1"


def test_parquet_errors_name_the_row(tmp_path):
    rows = [r.to_json() for r in _many_records()[:3]]
    rows[2]["rejected"]["scores"]["correctness"] = rows[2]["rejected"]["scores"]["correctness"][:-1]
    path = tmp_path / "bad.parquet"
    write_parquet(rows, path)
    with pytest.raises(DataError, match=rf"^{path}:row 2: rejected.scores.correctness has \d+ ratings for \d+ segments"):
        load_records(path)
    result = load_records(path, strict=False)
    assert len(result.records) == 2 and result.skipped == 1


def test_datasets_saved_to_disk_and_data_directory(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    recs = _many_records()
    rows = [r.to_json() for r in recs]
    for row in rows:
        row.setdefault("history", [])
        row.setdefault("id", None)
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    loaded = load_records(tmp_path / "saved")
    assert [r.prompt for r in loaded.records] == [r.prompt for r in recs]
    assert [r.chosen.scores for r in loaded.records] == [r.chosen.scores for r in recs]

    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "splits"))
    assert len(load_records(tmp_path / "splits", split="test").records) == 2
    with pytest.raises(DataError, match=r"no split 'dev'; splits: \['test', 'train'\]"):
        load_records(tmp_path / "splits", split="dev")

    # A plain directory of data files goes through datasets.load_dataset.
    (tmp_path / "raw").mkdir()
    write_jsonl(recs, tmp_path / "raw" / "train.jsonl")
    via_builder = load_records(tmp_path / "raw")
    assert [r.rejected.segments for r in via_builder.records] == [r.rejected.segments for r in recs]

    # Bad rows are named by split and row.
    rows[1]["chosen"]["scores"]["safety"] = [1] * len(rows[1]["chosen"]["segments"])
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad\[train\]:row 1: chosen.scores.safety\[0\] = 1"):
        load_records(tmp_path / "bad")


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"^no-such-org/no-such-dataset: cannot load with datasets"):
        load_records("no-such-org/no-such-dataset")


# ------------------------------------------------------------------ writing


def test_write_jsonl_is_atomic(tmp_path):
    recs = _many_records()
    path = tmp_path / "out" / "data.jsonl"
    assert write_jsonl(recs, path) == len(recs)
    assert [r.to_json() for r in load_records(path).records] == [r.to_json() for r in recs]
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_jsonl(recs[:2] + [{"prompt": object()}], path)  # fails while serializing
    assert path.read_bytes() == before  # the old file is untouched
    assert os.listdir(path.parent) == ["data.jsonl"]  # and no temp file is left
    # Dicts (the synthetic task's output) are written as given.
    dicts = synthetic.make_preference_records(3, seed=1)
    write_jsonl(dicts, path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == dicts


# ------------------------------------------------------------------ shipped data


def test_sample_file_loads_cleanly():
    result = load_records(SAMPLE_PATH)
    assert result.skipped == 0 and len(result.records) >= 3
    assert any(r.history for r in result.records)  # multi-turn
    assert any("```" in s for r in result.records for s in r.chosen.segments)  # a code block
    assert any(s.startswith("|") for r in result.records for s in r.chosen.segments)  # a table
    for rec in result.records:
        for resp in (rec.chosen, rec.rejected):
            assert resp.segments == stripped_segments(resp.text)  # segmented by our rules
            m = resp.score_matrix()
            comp = m[:, DEFAULT_ASPECTS.index("completeness")]
            assert (comp[1:] >= comp[:-1]).all()  # completeness never decreases
        c, r = rec.score_matrices()
        assert c.mean() > r.mean()  # chosen is the better response


def test_seed004_example_and_errors(tmp_path):
    result = load_seed004_layout(SEED004_EXAMPLE_PATH)
    assert result.skipped == 0 and len(result.records) == 1
    rec = result.records[0]
    assert rec.chosen.num_segments == 2 and rec.rejected.num_segments == 3
    assert rec.rejected.score_matrix(HELPSTEER_ASPECTS)[:, 0].tolist() == [3, 1, 0]

    base = json.loads(SEED004_EXAMPLE_PATH.read_text().splitlines()[0])
    short = copy.deepcopy(base)
    short["chosen_scores"][3] = [2]  # one rating for two sentences (as in the paper's own example)
    six = copy.deepcopy(base)
    six["rejected_scores"].append([4, 4, 4])  # six lists for five aspects
    path = _jsonl(tmp_path, [base, short, six], "layout.jsonl")
    with pytest.raises(DataError, match=rf"^{path}:2: chosen.scores.complexity has 1 ratings for 2 segments"):
        load_seed004_layout(path)
    result = load_seed004_layout(path, strict=False)
    assert result.skipped == 2 and len(result.records) == 1
    assert "rejected_scores has 6 per-aspect lists for 5 aspects" in result.errors[1]

    resp = response_from_aspect_lists("One. Two.", [[4, 3], [4, 4], [3, 3], [1, 1], [0, 1]])
    assert resp.segments == ["One.", "Two."] and resp.scores["verbosity"] == [0, 1]


# ------------------------------------------------------------------ validate job


def test_validate_job_on_datasets(tmp_path, capsys):
    assert validate.main([str(SAMPLE_PATH)]) == 0
    assert capsys.readouterr().out.startswith(f"OK: {SAMPLE_PATH}: 3 records")
    assert validate.main([str(SEED004_EXAMPLE_PATH), "--layout", "seed004"]) == 0
    assert "OK:" in capsys.readouterr().out

    path = _jsonl(tmp_path, [GOOD, _bad(lambda r: r["chosen"]["scores"].update(correctness=[4, 4, 4])), "{"])
    assert validate.main([str(path)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: {path}:2: chosen.scores.correctness has 3 ratings for 4 segments"
    assert validate.main([str(path), "--all"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"error: {path}:2:") and err[1].startswith(f"error: {path}:3: invalid JSON")
    assert err[-1] == f"FAILED: {path}: 2 bad record(s), 1 good"
    # HelpSteer aspects are not rated in the 2D sample.
    assert validate.main([str(SAMPLE_PATH), "--aspects", "helpsteer"]) == 1
    assert "missing aspect(s) ['coherence', 'complexity', 'verbosity']" in capsys.readouterr().err
