"""The task interface: prompt datasets in the layouts teams have, the held-out split,
length filtering, warm-start data, and the synthetic task behind the same interface."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twodrl.config import load_config
from twodrl.data import DataError
from twodrl.evaluation import bootstrap_ci, pair_outcome, win_rate
from twodrl.tasks import (
    SyntheticTask,
    TaskPrompt,
    build_task,
    held_out_split,
    load_prompts,
    load_sft_examples,
    normalise,
    parse_prompt_row,
)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompt_layouts(tmp_path):
    rows = [
        {"id": "a", "prompt": "Plain prompt?"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What now?"}]},
        # a HelpSteer-2D pair record: its prompt and history
        {"prompt": "And the second?", "history": [{"role": "user", "content": "First?"},
                                                 {"role": "assistant", "content": "One."}],
         "chosen": {"text": "x"}, "rejected": {"text": "y"}},
    ]
    prompts = load_prompts(_write(tmp_path / "p.jsonl", rows))
    assert [p.id for p in prompts] == ["a", "p-1", "p-2"]
    assert prompts[1].text == "What now?" and prompts[1].system == "Be brief."
    assert [m["content"] for m in prompts[1].history] == ["Hi", "Hello!"]
    assert prompts[2].history[0]["content"] == "First?"
    assert prompts[1].request() == {"prompt": "What now?", "history": [{"role": "user", "content": "Hi"},
                                                                      {"role": "assistant", "content": "Hello!"}],
                                    "system": "Be brief."}


def test_custom_prompt_field(tmp_path):
    path = _write(tmp_path / "uf.jsonl", [{"instruction": "Explain tides."}])
    assert load_prompts(path, prompt_field="instruction")[0].text == "Explain tides."


def test_row_without_either_field_names_file_and_fields(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"question": "where?"}])
    with pytest.raises(DataError) as e:
        load_prompts(path)
    msg = str(e.value)
    assert "bad.jsonl:2" in msg and "'prompt'" in msg and "'messages'" in msg and "question" in msg


def test_messages_must_end_with_user(tmp_path):
    path = _write(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                       {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match="last turn must be the user"):
        load_prompts(path)


def test_duplicate_ids_refused(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}])
    with pytest.raises(DataError, match="duplicate id"):
        load_prompts(path)


def test_parquet_prompts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["one", "two"]}), tmp_path / "p.parquet")
    assert [p.text for p in load_prompts(str(tmp_path / "p.parquet"))] == ["one", "two"]


def test_held_out_split_is_disjoint_after_normalising():
    prompts = [TaskPrompt(f"p{i}", t) for i, t in enumerate(["Hello  World", "hello world", "b", "c", "d", "e"])]
    for seed in range(5):
        train, held = held_out_split(prompts, 2, seed)
        assert len(held) == 2
        held_keys = {normalise(p.text) for p in held}
        assert not held_keys & {normalise(p.text) for p in train}
        assert len(train) + len(held) <= len(prompts)
    assert held_out_split(prompts, 2, 3) == held_out_split(prompts, 2, 3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=8).filter(lambda s: s.strip()), min_size=2, max_size=30),
       st.integers(0, 40), st.integers(0, 3))
def test_held_out_split_properties(texts, n_eval, seed):
    prompts = [TaskPrompt(f"p{i}", t) for i, t in enumerate(texts)]
    train, held = held_out_split(prompts, n_eval, seed)
    assert train, "at least one prompt is left to train on"
    assert not {normalise(p.text) for p in held} & {normalise(p.text) for p in train}
    assert len({normalise(p.text) for p in held}) == len(held)


def test_dataset_task_from_config(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": f"Question number {i}?"} for i in range(40)])
    sft = _write(tmp_path / "sft.jsonl", [
        {"prompt": "Q?", "response": "A."},
        {"messages": [{"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "A2."}]}])
    cfg = load_config(None, ["task.name=dataset", f"task.dataset={path}", "task.eval_prompts=8",
                             "task.train_prompts=20", f"task.sft_dataset={sft}"])
    task = build_task(cfg)
    assert len(task.eval) == 8 and len(task.train) == 20
    assert task.warm_start_examples(5) == [{"prompt": "Q?", "response": "A."}, {"prompt": "Q2?", "response": "A2."}]
    assert task.rm_training_responses(3) is None  # the policy's own responses are rated
    assert task.has_replay and task.replay_example(random.Random(0))["response"] in ("A.", "A2.")
    assert task.local_judge is None


def test_eval_dataset_overlap_dropped(tmp_path):
    train = _write(tmp_path / "t.jsonl", [{"prompt": "Same"}, {"prompt": "other"}])
    ev = _write(tmp_path / "e.jsonl", [{"prompt": " same "}])
    cfg = load_config(None, ["task.name=dataset", f"task.dataset={train}", f"task.eval_dataset={ev}"])
    task = build_task(cfg)
    assert [p.text for p in task.train] == ["other"]
    assert task.stats["task/dropped_overlap"] == 1


def test_sft_rows(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "no answer"}])
    with pytest.raises(DataError, match="'response'"):
        load_sft_examples(path)


def test_drop_too_long_counts_and_never_cuts():
    task = SyntheticTask(0)
    n_train, n_eval = len(task.train), len(task.eval)
    longest = max(len(p.text) for p in task.train)
    dropped = task.drop_too_long(lambda p: len(p.text), longest - 1)
    assert dropped >= 1 and task.stats["task/dropped_too_long"] == dropped
    assert len(task.train) + len(task.eval) == n_train + n_eval - dropped
    assert all(len(p.text) <= longest - 1 for p in task.train)


def test_synthetic_task_keeps_the_quickstart_data():
    from twodrl import synthetic

    task = SyntheticTask(0)
    train, held = synthetic.split_prompts(0)
    assert [p.text for p in task.train] == [p.text for p in train]
    assert [p.text for p in task.eval] == [p.text for p in held]
    # the warm-start stream the driver used before the task interface
    rng = random.Random(0)
    expected = [synthetic.sample_response(rng, train[i % len(train)].topic) for i in range(10)]
    assert [e["response"] for e in task.warm_start_examples(10)] == expected
    assert task.warm_start_examples(4) == task.warm_start_examples(10)[:4]
    assert task.local_judge == "synthetic"


def test_parse_prompt_row_rejects_non_string_prompt():
    with pytest.raises(DataError, match="non-empty string"):
        parse_prompt_row({"prompt": 3}, "x:1")


def test_shipped_prompts_load():
    from pathlib import Path

    import twodrl

    path = Path(twodrl.__file__).parent / "data" / "prompts_en.jsonl"
    if not path.exists():
        pytest.skip("shipped prompt set not present")
    prompts = load_prompts(str(path))
    assert len(prompts) >= 190 and any(p.history for p in prompts)


# ------------------------------------------------------------------ win rate


def test_pair_outcome_both_orders():
    assert pair_outcome([3.0, 2.0], [2.0, 2.0]) == 1.0
    assert pair_outcome([2.0, 2.0], [2.0, 2.0]) == 0.5
    assert pair_outcome([1.0, 3.0], [2.5, 2.5]) == 0.0


def test_win_rate_and_interval():
    out = win_rate([1.0] * 30 + [0.0] * 10 + [None] * 2)
    assert out["eval/win_rate"] == pytest.approx(0.75)
    assert out["eval/win_rate_failures"] == 2 and out["eval/win_rate_pairs"] == 40
    assert out["eval/win_rate_ci_low"] < 0.75 < out["eval/win_rate_ci_high"]
    assert bootstrap_ci([1.0] * 5) == (1.0, 1.0)
