"""The online RM update of the driver (``scorer.update_every_rounds``): judge-rated
samples gathered into ``RUN_DIR/reward_model_data.jsonl``, the RM fine-tuned on them and
``RUN_DIR/reward_model`` replaced with a loadable checkpoint, ``rm/mae/<aspect>`` logged
every round.

The driver method runs against an in-process scorer (``ray.get`` of the driver module is
the identity here), so no cluster is needed; the scorer is the real actor class."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from jobs.driver import OnlineDriver
from twodrl import synthetic
from twodrl.config import load_config
from twodrl.metrics import round_metric_keys
from twodrl.rounds import ScoredSample

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")
ASPECTS = ["helpfulness", "correctness", "safety", "completeness", "clarity"]


class _Method:
    def __init__(self, fn):
        self.remote = fn


class _Handle:
    """Looks like an actor handle to the driver: ``h.train.remote(...)``."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        return _Method(getattr(self._obj, name))


def _driver(tmp_path, overrides, monkeypatch):
    from actors.scorer import RewardScorer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr("jobs.driver.ray.get", lambda x, **_: x)
    cfg = load_config(CONFIG, ["scorer.train_batch_size=8", *overrides])
    drv = SimpleNamespace(cfg=cfg, aspects=ASPECTS, run_dir=tmp_path / "run", total_rounds=cfg.rounds + 1,
                          scorers=[_Handle(RewardScorer(cfg, 0)), _Handle(RewardScorer(cfg, 1))])
    drv.run_dir.mkdir(parents=True)
    drv._labelled = lambda s, j: OnlineDriver._labelled(drv, s, j)
    drv.update = lambda judged, r: OnlineDriver.update_reward_model(drv, judged, r)
    return drv


def _audit(drv, n=12, seed=0):
    """Samples rated by the (untrained) RM, with the judge's answer beside each."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = sorted(synthetic.ANIMALS)[i % len(synthetic.ANIMALS)]
        prompt = f"Tell me about the {topic}."
        text = synthetic.sample_response(rng, topic)
        s = ScoredSample(prompt_id=f"p{i}", prompt=prompt, text=text, segments=[], scores=[])
        rated = drv.scorers[0].score.remote([{"id": "0", "prompt": prompt, "response": text}])[0]
        s.segments, s.scores = rated["segments"], rated["scores"]
        segs = synthetic.split_sentences(text)
        judge = (segs, synthetic.score_segments(prompt, segs, ASPECTS)) if i % 5 else None  # some judge failures
        out.append((s, judge))
    return out


def _mae(drv, judged):
    rows = drv.scorers[0].score.remote([{"id": str(i), "prompt": s.prompt, "response": s.text}
                                        for i, (s, j) in enumerate(judged) if j is not None])
    errs = [abs(m[k] - r[k]) for (s, j), row in zip([x for x in judged if x[1] is not None], rows)
            for m, r in zip(row["scores"], j[1]) for k in range(len(ASPECTS))]
    return sum(errs) / len(errs)


def test_update_trains_saves_and_logs_mae(tmp_path, monkeypatch):
    drv = _driver(tmp_path, ["scorer.update_every_rounds=1", "scorer.update_epochs=6", "scorer.update_lr=0.003"],
                  monkeypatch)
    judged = _audit(drv)
    before = _mae(drv, judged)
    out = drv.update(judged, 0)
    assert {f"rm/mae/{a}" for a in ASPECTS} <= set(out)
    assert all(not math.isnan(out[f"rm/mae/{a}"]) for a in ASPECTS)
    assert out["rm_update/records"] == sum(1 for _, j in judged if j is not None)
    assert out["rm_update/epoch"] == 6 and out["time/rm_update_s"] > 0
    # The fine-tuned RM is closer to the judge, and every scorer serves it.
    after = _mae(drv, judged)
    assert after < before
    ckpt = drv.run_dir / "reward_model"
    assert (ckpt / "config.json").is_file()
    from transformers import AutoModelForTokenClassification

    saved = AutoModelForTokenClassification.from_pretrained(ckpt)
    assert [saved.config.id2label[i] for i in range(5)] == ASPECTS
    assert drv.scorers[1]._obj.model_cfg.path == str(ckpt)

    # Round 1 adds its rows; a redone round 1 replaces them instead of adding twice.
    drv.update(_audit(drv, n=6, seed=1), 1)
    drv.update(_audit(drv, n=6, seed=2), 1)
    data = [json.loads(x) for x in (drv.run_dir / "reward_model_data.jsonl").read_text().splitlines()]
    assert [r["round"] for r in data].count(1) == 4 and [r["round"] for r in data].count(0) == 9
    assert set(data[0]["chosen"]["scores"]) == set(ASPECTS)


def test_no_update_when_off_or_after_the_last_round(tmp_path, monkeypatch):
    drv = _driver(tmp_path, ["scorer.update_every_rounds=0"], monkeypatch)
    judged = _audit(drv, n=4)
    out = drv.update(judged, 0)
    assert set(out) == {f"rm/mae/{a}" for a in ASPECTS}
    assert not (drv.run_dir / "reward_model").exists()
    # Nothing judged: the keys are still there (every metrics line has them), as NaN.
    assert all(math.isnan(v) for v in drv.update([(s, None) for s, _ in judged], 1).values())

    drv = _driver(tmp_path / "b", ["scorer.update_every_rounds=1"], monkeypatch)
    out = drv.update(_audit(drv, n=4), drv.total_rounds - 1)  # no round scores after the last
    assert "rm_update/records" not in out and not (drv.run_dir / "reward_model").exists()


def test_mae_keys_are_round_metrics():
    keys = round_metric_keys(ASPECTS)
    assert all(f"rm/mae/{a}" in keys and f"rm/agreement/{a}" in keys for a in ASPECTS)


@pytest.mark.parametrize("every,due", [(1, [0, 1, 2, 3]), (2, [1, 3])])
def test_update_schedule(tmp_path, monkeypatch, every, due):
    drv = _driver(tmp_path, [f"scorer.update_every_rounds={every}", "scorer.update_epochs=1"], monkeypatch)
    judged = _audit(drv, n=3)
    trained = [r for r in range(drv.total_rounds) if "rm_update/records" in drv.update(judged, r)]
    assert trained == due


def test_update_on_rm_learner_group(tmp_path, monkeypatch):
    """scorer.train_ranks > 1: the update trains on the reward-model DeepSpeed group
    (faked here by the one-process loop), which starts from the RM the scorers serve and
    is shut down after it; every scorer then reloads what it saved."""
    from dataclasses import replace

    import actors.reward_learner as reward_learner
    from twodrl.models.loading import load_reward_model, load_tokenizer, save_pretrained_safe
    from twodrl.models.reward_model import train_reward_model

    made = []

    class FakeGroup:
        def __init__(self, cfg, records, sc=None, model_path=None, namespace=None, **_):
            self.sc, self.model_path, self.records, self.closed = sc, model_path, list(records), False
            self.mc = replace(sc.model, path=model_path)
            self.model = load_reward_model(self.mc, aspects=ASPECTS)
            self.plan = [None] * sc.train_epochs
            self.epochs_done = 0
            made.append(self)

        def train_epoch(self):
            self.epochs_done = len(self.plan)
            return train_reward_model(self.model, load_tokenizer(self.mc), self.records, self.sc, progress=False)

        def save_pretrained(self, directory, extra_files=None):
            save_pretrained_safe(self.model, load_tokenizer(self.mc), directory)

        def shutdown(self):
            self.closed = True

    monkeypatch.setattr(reward_learner, "RewardLearnerGroup", FakeGroup)
    drv = _driver(tmp_path, ["scorer.update_every_rounds=1", "scorer.update_epochs=2", "scorer.update_lr=0.003",
                             "scorer.train_ranks=2"], monkeypatch)
    drv.namespace = "t"
    drv._update_rm_on_group = lambda rows: OnlineDriver._update_rm_on_group(drv, rows)
    out = drv.update(_audit(drv, n=6), 0)
    ckpt = drv.run_dir / "reward_model"
    assert out["rm_update/epoch"] == 2 and (ckpt / "config.json").is_file()
    first = made[0]
    assert first.closed and first.sc.train_epochs == 2 and first.sc.train_lr == 0.003
    assert first.model_path == drv.cfg.scorer.model.path  # nothing saved yet: the configured RM
    assert all(s._obj.model_cfg.path == str(ckpt) for s in drv.scorers)
    drv.update(_audit(drv, n=6, seed=1), 1)
    assert made[1].model_path == str(ckpt)  # the next update continues from the last one
