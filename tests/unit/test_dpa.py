"""DPA core (seed 003): direction sampling, the system prompt, best-of-n by vᵀr."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twodrl.dpa import (
    best_of_n,
    default_constraint,
    direction_from_weights,
    direction_system_prompt,
    direction_weights,
    parse_direction_system_prompt,
    sample_directions,
    select_winners,
)


def test_two_objective_directions_angle_range_and_uniformity():
    v = sample_directions(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert v.shape == (20000, 2)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(20000, dtype=torch.float64))
    ang = torch.atan(v[:, 1] / v[:, 0])
    assert ang.min() >= -math.pi / 4 and ang.max() <= 0
    # v1 ∈ [√2/2, 1], v2 ∈ [−√2/2, 0] as the paper states.
    assert v[:, 0].min() >= math.sqrt(2) / 2 - 1e-12 and (v[:, 1] <= 0).all()
    # Uniform in angle: each quarter of the range holds about a quarter of the draws.
    counts = torch.histc(ang, bins=4, min=-math.pi / 4, max=0.0)
    assert ((counts / 20000 - 0.25).abs() < 0.02).all()
    # Same generator seed → same directions; custom range respected.
    again = sample_directions(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(v, again)
    w = sample_directions(500, angle_low=0.1, angle_high=0.2, generator=torch.Generator().manual_seed(1))
    a = torch.atan2(w[:, 1], w[:, 0])
    assert a.min() >= 0.1 - 1e-6 and a.max() <= 0.2 + 1e-6


def test_k_objective_directions_satisfy_constraints():
    v = sample_directions(3000, k=3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3000, dtype=torch.float64))
    assert ((v[:, 0] > v[:, 2]) & (v[:, 2] >= 0)).all()  # v1 > v3 ≥ 0
    ang = torch.atan2(v[:, 1], v[:, 0])
    assert ang.min() >= -math.pi / 4 and ang.max() <= 0
    assert default_constraint(v).all()
    # Not degenerate: the third objective actually varies.
    assert v[:, 2].std() > 0.1
    # A custom constraint replaces the default (here: the open positive orthant).
    u = sample_directions(200, k=4, constraint=lambda x: (x > 0).all(dim=1), generator=torch.Generator().manual_seed(3))
    assert (u > 0).all()
    with pytest.raises(ValueError, match="admissible region"):
        sample_directions(5, k=3, constraint=lambda x: x[:, 0] > 2.0, max_rounds=3)
    with pytest.raises(ValueError):
        sample_directions(5, k=1)


def test_system_prompt_integer_weights_and_roundtrip():
    text = direction_system_prompt([0.8, -0.6], ["helpfulness", "verbosity"])
    assert "helpfulness=80" in text and "verbosity=-60" in text
    assert parse_direction_system_prompt(text) == {"helpfulness": 80, "verbosity": -60}
    # round(100·v): 0.7071 → 71, −0.7071 → −71, 0.125 → 13 (halves away from zero), −0.004 → 0.
    assert direction_weights([0.70710678, -0.70710678, 0.125, -0.004]) == [71, -71, 13, 0]
    # The prompt can sit inside a longer system message.
    wrapped = "You are a helpful assistant.\n" + text + "\nBe kind."
    assert parse_direction_system_prompt(wrapped) == {"helpfulness": 80, "verbosity": -60}
    v = direction_from_weights(parse_direction_system_prompt(text), ["helpfulness", "verbosity"], dtype=torch.float64)
    torch.testing.assert_close(v, torch.tensor([0.8, -0.6], dtype=torch.float64))
    with pytest.raises(ValueError, match="no 'Reply preferences"):
        parse_direction_system_prompt("You are a helpful assistant.")
    with pytest.raises(ValueError, match="2 names"):
        direction_system_prompt([1.0, 0.0, 0.0], ["helpfulness", "verbosity"])


@settings(max_examples=50, deadline=None)
@given(theta=st.floats(-math.pi / 4, 0.0), k3=st.floats(0.0, 0.5))
def test_system_prompt_roundtrip_property(theta, k3):
    v = [math.cos(theta), math.sin(theta), k3]
    names = ["helpfulness", "verbosity", "harmlessness"]
    parsed = parse_direction_system_prompt(direction_system_prompt(v, names))
    assert list(parsed) == names
    for name, x in zip(names, v):
        assert abs(parsed[name] - 100 * x) <= 0.5 + 1e-9


def test_best_of_n_depends_on_direction():
    # Rewards (helpfulness, verbosity) of three responses.
    r = torch.tensor([[3.0, 3.0], [2.8, 1.0], [1.0, -2.0]])
    assert best_of_n(r, torch.tensor([1.0, 0.0])) == 0  # pure helpfulness: 3.0 is best
    # (√2/2, −√2/2): vᵀr ∝ h − v = 0.0, 1.8, 3.0 → the terse third response wins.
    assert best_of_n(r, torch.tensor([math.sqrt(0.5), -math.sqrt(0.5)])) == 2
    # (0.8, −0.6): 0.6, 1.64, 2.0 → third.
    assert best_of_n(r, torch.tensor([0.8, -0.6])) == 2
    # (0.96, −0.28): 2.04, 2.408, 1.52 → second.
    assert best_of_n(r, torch.tensor([0.96, -0.28])) == 1
    # Ties go to the first.
    assert best_of_n(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([1.0, 0.0])) == 0


def test_select_winners_matches_per_prompt_best_of_n():
    g = torch.Generator().manual_seed(4)
    P, N, k = 6, 5, 2
    rewards = torch.randn(P, N, k, generator=g)
    dirs = sample_directions(P, generator=g)
    win = select_winners(rewards, dirs)
    assert win.index.tolist() == [best_of_n(rewards[p], dirs[p]) for p in range(P)]
    torch.testing.assert_close(win.score, torch.stack([rewards[p, win.index[p]] @ dirs[p] for p in range(P)]))
    # Shared direction and a validity mask (an all-invalid prompt gets −1).
    valid = torch.ones(P, N, dtype=torch.bool)
    valid[0, win.index[0]] = False
    valid[1] = False
    masked = select_winners(rewards, torch.tensor([1.0, 0.0]), valid=valid)
    assert masked.index[1].item() == -1 and masked.score[1].item() == -math.inf
    expected0 = max((rewards[0, n, 0].item(), n) for n in range(N) if valid[0, n])[1]
    assert masked.index[0].item() == expected0
    with pytest.raises(ValueError, match="directions"):
        select_winners(rewards, torch.ones(P, 3))


# --------------------------------------------------------------------------- iterations


def test_disjoint_parts_split_the_pool():
    from twodrl.rounds import disjoint_parts

    parts = disjoint_parts(23, 4, seed=3)
    assert sorted(i for p in parts for i in p) == list(range(23))  # every prompt, once
    assert sorted(len(p) for p in parts) == [5, 6, 6, 6]
    assert parts == disjoint_parts(23, 4, seed=3)  # the seed fixes the split
    assert parts != disjoint_parts(23, 4, seed=4)
    with pytest.raises(ValueError, match="cannot fill"):
        disjoint_parts(3, 4, seed=0)


def test_part_picks_stay_in_their_part_and_are_stateless():
    from twodrl.rounds import disjoint_parts, part_picks

    parts = disjoint_parts(40, 3, seed=1)
    for k in range(3):
        picks = part_picks(40, 3, k, 8, seed=1)
        assert len(picks) == 8 and {i for _, i in picks} <= set(parts[k])
        assert len({i for _, i in picks}) == 8  # no repeat within the part's first epoch
        assert picks == part_picks(40, 3, k, 8, seed=1)  # a redone round draws the same
    # More prompts than the part holds: the part's next epoch, still nothing outside it.
    many = part_picks(40, 3, 2, 20, seed=1)  # the part holds 13
    assert {i for _, i in many} == set(parts[2]) and {e for e, _ in many} == {0, 1}
    with pytest.raises(ValueError, match="part 3"):
        part_picks(40, 3, 3, 1, seed=1)


def test_selected_data_accumulates_and_a_redone_round_replaces_its_rows(tmp_path):
    from twodrl.dpa import read_selected, record_selected

    path = tmp_path / "dpa" / "selected.jsonl"
    assert read_selected(path) == []
    r0 = record_selected(path, 0, [{"prompt": "a", "response": "A"}, {"prompt": "b", "response": "B"}])
    assert [(r["round"], r["prompt"]) for r in r0] == [(0, "a"), (0, "b")]
    r1 = record_selected(path, 1, [{"prompt": "c", "response": "C"}])
    assert [(r["round"], r["prompt"]) for r in r1] == [(0, "a"), (0, "b"), (1, "c")]
    # Round 2 written, then the run resumes from round 1's checkpoint and redoes round 2:
    # its first attempt's rows go, the earlier rounds' stay, nothing twice.
    record_selected(path, 2, [{"prompt": "d", "response": "D"}])
    redone = record_selected(path, 2, [{"prompt": "e", "response": "E"}])
    assert [(r["round"], r["prompt"]) for r in redone] == [(0, "a"), (0, "b"), (1, "c"), (2, "e")]
    assert read_selected(path) == redone
    # A resume that goes back further (round 1 redone) drops round 2's rows as well.
    again = record_selected(path, 1, [{"prompt": "f", "response": "F"}])
    assert [(r["round"], r["prompt"]) for r in again] == [(0, "a"), (0, "b"), (1, "f")]
    assert not list(path.parent.glob(".*tmp*"))  # written through a renamed temporary


def test_request_round_from_request_id():
    from jobs.driver import _request_round

    assert _request_round("r0-e0-p5") == 0
    assert _request_round("r12-e1-p3-d4") == 12
    with pytest.raises(ValueError, match="r<round>"):
        _request_round("eval-3")


# --------------------------------------------------------------------------- sequence RM


def test_scorer_sequence_mode_rates_the_whole_response_at_its_last_token():
    """scorer.mode=sequence: one rating per objective for the whole response, the
    sequence-classification model's own output at the response's last token."""
    from actors.scorer import RewardScorer
    from twodrl.config import load_config
    from twodrl.models.logprobs import encode_pairs
    from twodrl.models.reward_model import sequence_end_positions

    cfg = load_config(None, ["algorithm=dpa-rsf", "aspects.names=[helpfulness, verbosity]",
                             "aspects.weights=[1.0, 0.0]", "scorer.mode=sequence", "scorer.model.path=tiny:reward-seq",
                             "scorer.batch_size=2"])
    scorer = RewardScorer(cfg, index=0)
    items = [{"id": "a", "prompt": "Tell me about the otter.",
              "response": "The otter lives in rivers. The otter eats fish. It swims well."},
             {"id": "b", "prompt": "Tell me about the owl.", "response": "The owl hunts at night."},
             {"id": "c", "prompt": "Tell me about the fox.", "response": "The fox is quick."}]
    out = scorer.score(items)
    assert [o["id"] for o in out] == ["a", "b", "c"]
    assert len(out[0]["segments"]) == 3  # the segmenter still splits (verbosity may count them)
    model = scorer.model
    for it, o in zip(items, out):
        assert len(o["scores"]) == 1 and len(o["scores"][0]) == 2
        enc = encode_pairs(scorer.tokenizer, [it["prompt"]], [it["response"]], [None], [None],
                           max_length=cfg.scorer.model.max_length)
        _, cols, valid = sequence_end_positions(enc)
        assert bool(valid[0, 0])
        ids = enc.input_ids[:1, : int(cols[0, 0]) + 1]
        with torch.no_grad():
            # The HF model's own pooled output (last token of the sequence it is given).
            expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
        expected = expected.clamp(0.0, 4.0)
        torch.testing.assert_close(torch.tensor(o["scores"][0]), expected, atol=1e-4, rtol=1e-4)
    # A different response gets a different rating: the read-out depends on the text.
    assert out[0]["scores"] != out[1]["scores"]


def test_sequence_mode_is_served_by_the_hf_scorer():
    """The vLLM scorer path reads per-token outputs of a token-classification RM only:
    ``auto`` picks hf for a sequence RM, and an explicit vllm is refused."""
    from twodrl.config import ConfigError, load_config

    fixed = ["scorer.num_gpus=1", "scorer.rm_train_responses=0", "scorer.update_every_rounds=0"]
    assert load_config(None, fixed).scorer.resolved_backend() == "vllm"
    assert load_config(None, [*fixed, "scorer.mode=sequence"]).scorer.resolved_backend() == "hf"
    with pytest.raises(ConfigError, match="serves token-classification"):
        load_config(None, [*fixed, "scorer.mode=sequence", "scorer.backend=vllm"])
