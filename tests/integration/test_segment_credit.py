"""Segment credit through the real learner: per-token log-probs with segment ids from
2 DeepSpeed ranks (CPU), before and after one 2D-DPO round on held-out pairs. ZeRO-3
too, because there every forward is collective and all ranks must take part."""

from __future__ import annotations

import math

import pytest
import torch

from twodrl.config import load_config
from twodrl.diagnostics import credit_metric_keys, credit_metrics, split_probe_pairs
from twodrl.synthetic import make_preference_records

pytestmark = pytest.mark.integration

PAIRS = make_preference_records(10, seed=5)


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def learner(ray_cluster, request):
    from actors.learner import PolicyLearnerGroup

    stage = request.param
    cfg = load_config(None, [
        f"run_name=segment-credit-z{stage}", f"learner.zero_stage={stage}", "learner.colocate_reference=true",
        "learner.num_ranks=2", "learner.micro_batch_size=2", "learner.epochs_per_round=1", "learner.lr=2e-3",
        "rounds=4", "rollout.prompts_per_round=8",
    ])
    group = PolicyLearnerGroup(cfg)
    yield group
    group.shutdown()


def test_segment_logprobs_align_with_training_and_feed_the_credit_dict(learner):
    from twodrl.models.loading import load_tokenizer
    from twodrl.models.logprobs import encode_sequences

    cfg = learner.cfg
    probe, train = split_probe_pairs(PAIRS, 2, seed=cfg.seed)
    assert len(probe) == 2 and len(train) == len(PAIRS) - 2

    before = learner.segment_logprobs(probe)
    assert len(before) == 2
    # Tokens and segments are the ones training sees: the same encoding, on its own.
    tok = load_tokenizer(cfg.policy)
    for side in ("chosen", "rejected"):
        enc = encode_sequences(tok, [p["prompt"] for p in probe], [p[side]["text"] for p in probe],
                               segments=[p[side]["segments"] for p in probe])
        for rec, e, got in zip(probe, enc, before):
            s = got.side(side)
            assert len(s.token_logps) == len(s.segment_ids) == len(e.response_ids)
            assert s.segment_ids == e.segment_ids
            counts = torch.bincount(torch.tensor(s.segment_ids), minlength=len(rec[side]["segments"]))
            assert len(counts) == len(rec[side]["segments"]) and bool((counts > 0).all())
            assert s.segment_ids == sorted(s.segment_ids)
            assert all(math.isfinite(x) and x <= 0 for x in s.token_logps)
    # The chosen side's log-probs are the policy's, as compute_logprobs measures them.
    plain = learner.compute_logprobs([{"prompt": p["prompt"], "response": p["chosen"]["text"]} for p in probe])
    for a, b in zip(plain, before):
        assert torch.allclose(torch.tensor(a), torch.tensor(b.chosen.token_logps), atol=1e-4)

    learner.train_round(train, "2d-dpo")
    after = learner.segment_logprobs(probe)
    for b, a in zip(before, after):
        for side in ("chosen", "rejected"):
            assert a.side(side).segment_ids == b.side(side).segment_ids
    assert any(abs(x - y) > 1e-5 for b, a in zip(before, after) for x, y in zip(b.chosen.token_logps, a.chosen.token_logps))

    m = credit_metrics(probe, before, after, cfg.aspects.names, cfg.aspects.weights)
    assert set(m) == set(credit_metric_keys())
    n_segments = sum(len(p[s]["segments"]) for p in probe for s in ("chosen", "rejected"))
    assert sum(v for k, v in m.items() if k.endswith("_n")) == n_segments
    for k, v in m.items():
        if k.endswith("_n"):
            continue
        n = m.get(f"{k}_n")
        if n:  # a non-empty group has a finite mean
            assert math.isfinite(v), k
