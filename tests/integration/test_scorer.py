"""The RewardScorer actor with the tiny 2D reward model on a local Ray cluster."""

from __future__ import annotations

import math

import pytest
import ray

from twodrl.aspects import DEFAULT_ASPECTS
from twodrl.config import load_config
from twodrl.segmentation import stripped_segments
from twodrl.synthetic import make_preference_records, score_segments

pytestmark = pytest.mark.integration

RECORDS = make_preference_records(48, seed=5)


def _items(records):
    out = []
    for i, r in enumerate(records):
        for side in ("chosen", "rejected"):
            out.append({"id": f"{i}-{side}", "prompt": r["prompt"], "response": r[side]["text"]})
    return out


def _mse(results, items):
    by_id = {it["id"]: it for it in items}
    err, n = 0.0, 0
    for res in results:
        it = by_id[res["id"]]
        truth = score_segments(it["prompt"], res["segments"], DEFAULT_ASPECTS)
        for row, t in zip(res["scores"], truth):
            err += sum((a - b) ** 2 for a, b in zip(row, t))
            n += len(t)
    return err / n


@pytest.fixture(scope="module")
def scorers(ray_cluster):
    from actors.scorer import create_scorers

    cfg = load_config(None, ["run_name=scorer-test", "scorer.num_workers=2", "scorer.batch_size=8", "scorer.train_epochs=6",
                             "scorer.train_lr=3e-3"])
    handles = create_scorers(cfg)
    yield cfg, handles
    for h in handles:
        ray.kill(h, no_restart=True)


def test_score_shape_names_and_segments(scorers):
    cfg, (s0, s1) = scorers
    items = _items(RECORDS[:4])
    items[0] = dict(items[0], segments=RECORDS[0]["chosen"]["segments"])
    out = ray.get(s0.score.remote(items))
    assert [o["id"] for o in out] == [it["id"] for it in items]
    for o, it in zip(out, items):
        assert o["segments"] == stripped_segments(it["response"])
        assert len(o["scores"]) == len(o["segments"]) > 0
        for row in o["scores"]:
            assert len(row) == len(DEFAULT_ASPECTS)
            assert all(0.0 <= v <= 4.0 and not math.isnan(v) for v in row)
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "twodrl-scorer-test"}
    assert {"scorer-0", "scorer-1"} <= names


def test_truncated_segments_are_dropped_not_nan(ray_cluster):
    from actors.scorer import RewardScorer

    cfg = load_config(None, ["scorer.model.path=tiny:reward", "scorer.model.max_length=40"])
    scorer = ray.remote(RewardScorer).options(num_cpus=0.25).remote(cfg, 0)
    long = " ".join(["The owl eats mice.", "The owl hoots.", "The owl lives in forests."] * 6)
    (res,) = ray.get(scorer.score.remote([{"id": "x", "prompt": "Tell me about the owl.", "response": long}]))
    ray.kill(scorer)
    assert 0 < len(res["segments"]) < 18
    assert len(res["scores"]) == len(res["segments"])
    assert not any(math.isnan(v) for row in res["scores"] for v in row)


def test_train_learns_the_rules_and_save_load(scorers, tmp_path):
    cfg, (s0, s1) = scorers
    held = _items(make_preference_records(12, seed=99))
    before = _mse(ray.get(s0.score.remote(held)), held)
    metrics = ray.get(s0.train.remote(RECORDS))
    assert metrics and all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    after_results = ray.get(s0.score.remote(held))
    after = _mse(after_results, held)
    assert after < 0.5 * before, (before, after)
    # Another scorer of the pool loads the saved weights and then agrees exactly.
    path = ray.get(s0.save.remote(str(tmp_path / "rm")))
    ray.get(s1.load.remote(path))
    assert ray.get(s1.score.remote(held)) == after_results
