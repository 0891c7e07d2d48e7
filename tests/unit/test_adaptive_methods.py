"""ADPO, ARS, the ungrouped 2D-DPO form and the Schmitt-trigger choice as a run selects
them (config → objective), checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from twodrl import objectives
from twodrl.config import ConfigError, LearnerConfig, load_config

F64 = torch.float64
W2 = [0.5, 0.5]  # two aspects, equal weights: a segment's reward is the mean rating


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _pair_batch(chosen_tokens, rejected_tokens, chosen_scores, rejected_scores):
    """One pair as the learner sees it: ``*_tokens`` are per-token (log-ratio, segment id)
    lists, scores ``[S][A]``. Returns the batch and the policy log-ratios ``[2, T]``."""
    T = max(len(chosen_tokens), len(rejected_tokens))
    ratios = torch.zeros(2, T, dtype=F64)
    seg = torch.full((2, T), -1, dtype=torch.long)
    for row, toks in enumerate((chosen_tokens, rejected_tokens)):
        for t, (lr, s) in enumerate(toks):
            ratios[row, t], seg[row, t] = lr, s
    scores = objectives.scores_tensor([chosen_scores, rejected_scores], 2).to(F64)
    batch = objectives.SequenceBatch(
        input_ids=torch.zeros(2, T, dtype=torch.long), attention_mask=torch.ones(2, T, dtype=torch.long),
        response_mask=seg >= 0, segment_ids=seg, scores=scores, num_pairs=1, aspects=("a", "b"),
    )
    return batch, ratios


def _pref(algorithm, batch, ratios, cfg, weights=W2):
    # Reference log-probs 0: the policy's token log-probs are the log-ratios.
    pol = {"token_logps": ratios.clone().requires_grad_(True)}
    ref = {"token_logps": torch.zeros_like(ratios)}
    loss, m = objectives.compute_preference_loss(algorithm, pol, ref, batch, cfg, weights)
    return loss, m, pol["token_logps"]


# --------------------------------------------------------------------------- 2D-DPO forms


def _two_d_example():
    # chosen: segment 0 = tokens (0.2, 0.1) rated [4, 4]; segment 1 = token (−0.4) rated [0, 4]
    # rejected: segment 0 = tokens (0.5, −0.1) rated [2, 2]
    return _pair_batch([(0.2, 0), (0.1, 0), (-0.4, 1)], [(0.5, 0), (-0.1, 0)], [[4, 4], [0, 4]], [[2, 2]])


def test_two_d_dpo_ungrouped_is_eq5_with_plain_beta_by_hand():
    batch, ratios = _two_d_example()
    # g = Σ_a w_a (s_a/4 + 1): chosen 2.0 and 1.5, rejected 1.5; R = segment log-ratio sums.
    # Eq. 5, β = 0.5 on both sides: β(2.0·0.3 + 1.5·(−0.4)) − β(1.5·0.4) = −0.3
    cfg = LearnerConfig(beta=0.5, two_d_dpo_form="ungrouped", sft_coef=0.0)
    loss, m, _ = _pref("2d-dpo", batch, ratios, cfg)
    assert m["pref_loss"] == pytest.approx(_softplus(0.3), abs=1e-12)  # −log σ(−0.3) = 0.854355…
    assert m["pref_loss"] == pytest.approx(0.8543552444685271, abs=1e-12)
    assert float(loss.detach()) == pytest.approx(m["pref_loss"])


def test_two_d_dpo_grouped_form_is_the_default_and_differs_by_hand():
    batch, ratios = _two_d_example()
    assert LearnerConfig().two_d_dpo_form == "grouped"
    # Eq. 6: N = min(2, 1) = 1; best chosen segment (g 2.0, R 0.3) against the worst
    # rejected one (g 1.5, R 0.4); β_c = β/2.0, β_r = β/1.5 cancel g: −log σ(0.5·(0.3 − 0.4)).
    _, m, _ = _pref("2d-dpo", batch, ratios, LearnerConfig(beta=0.5, sft_coef=0.0))
    assert m["pref_loss"] == pytest.approx(_softplus(0.05), abs=1e-12)


def test_two_d_dpo_form_is_a_checked_config_field():
    assert load_config(None, ["learner.two_d_dpo_form=ungrouped"]).learner.two_d_dpo_form == "ungrouped"
    with pytest.raises(ConfigError, match="two_d_dpo_form"):
        load_config(None, ["learner.two_d_dpo_form=eq5"])


# --------------------------------------------------------------------------- ADPO


def test_adpo_masks_and_loss_by_hand():
    # chosen: a good segment (reward 4, two tokens) then a bad one (reward 0, one token);
    # rejected: one middling segment (reward 2, two tokens).
    batch, ratios = _pair_batch([(0.2, 0), (0.1, 0), (0.7, 1)], [(0.5, 0), (-0.1, 0)], [[4, 4], [0, 0]], [[2, 2]])
    cfg = LearnerConfig(beta=0.5, sft_coef=0.0, schmitt_delta=0.1)
    kept = objectives.adpo_masks(batch, W2, cfg)
    # sequence rewards 8/3 and 2, baseline 7/3: the chosen response keeps its good tokens
    # and drops the bad one; the rejected tokens (2 < 7/3 − 0.1) are bad, so all are kept.
    assert kept.tolist() == [[1, 1, 0], [1, 1, 0]]
    loss, m, lp = _pref("adpo", batch, ratios, cfg)
    # −log σ(β(Σ M_c ρ_c − Σ M_r ρ_r)) = −log σ(0.5·(0.3 − 0.4)); the chosen 0.7 is masked out
    assert m["pref_loss"] == pytest.approx(_softplus(0.05), abs=1e-12)
    assert m["mask_fraction"] == pytest.approx(4 / 5)
    loss.backward()
    assert lp.grad[0, 2].item() == 0.0 and lp.grad[0, 0].item() != 0.0  # no gradient through masked tokens


def test_adpo_keeps_the_sft_term_convention():
    batch, ratios = _pair_batch([(0.2, 0), (0.1, 0)], [(0.5, 0)], [[4, 4]], [[0, 0]])
    _, m, _ = _pref("adpo", batch, ratios, LearnerConfig(beta=0.5, sft_coef=0.1))
    assert m["loss"] == pytest.approx(m["pref_loss"] + 0.1 * m["sft_loss"], rel=1e-9)


def _band_example():
    # chosen tokens rewarded 4 then exactly the baseline: rewards 4 and 4/3, rejected 0
    # and 0 → sequence rewards 8/3 and 0, baseline 4/3; the second chosen token is in the
    # band, where Eq. 18 gives 0 and the hysteresis trigger keeps the state 1.
    third = 4 / 3
    return _pair_batch([(0.2, 0), (0.3, 1)], [(0.1, 0), (0.1, 0)], [[4, 4], [third, third]], [[0, 0]])


@pytest.mark.parametrize("hysteresis,expected", [(True, [1, 1]), (False, [1, 0])])
def test_schmitt_trigger_choice_reaches_adpo(hysteresis, expected):
    batch, ratios = _band_example()
    cfg = LearnerConfig(schmitt_delta=0.1, schmitt_hysteresis=hysteresis)
    assert objectives.adpo_masks(batch, W2, cfg)[0].tolist() == expected
    # and the loss sees it: the in-band token's log-ratio 0.3 counts only with hysteresis
    _, m, _ = _pref("adpo", batch, ratios, LearnerConfig(beta=1.0, sft_coef=0.0, schmitt_hysteresis=hysteresis))
    margin = (0.2 + (0.3 if hysteresis else 0.0)) - 0.2
    assert m["pref_loss"] == pytest.approx(_softplus(-margin), abs=1e-12)


def test_schmitt_trigger_choice_reaches_appo():
    # APPO's masks come from the same learner fields.
    batch, _ = _band_example()
    rollout = objectives.select_rows(batch, torch.tensor([0, 1]))
    on = objectives.appo_advantages(rollout, W2, 2, LearnerConfig(schmitt_hysteresis=True))
    off = objectives.appo_advantages(rollout, W2, 2, LearnerConfig(schmitt_hysteresis=False))
    assert on.mask[0, :2].tolist() == [1, 1] and off.mask[0, :2].tolist() == [1, 0]


def test_schmitt_default_is_hysteresis_and_eq18_is_selectable():
    assert LearnerConfig().schmitt_hysteresis is True
    assert load_config(None, ["learner.schmitt_hysteresis=false"]).learner.schmitt_hysteresis is False


# --------------------------------------------------------------------------- ARS


def _rollout_batch(rows):
    """Rows of (per-token log-prob, segment id) lists with ``[S][A]`` scores, K = 2."""
    T = max(len(toks) for toks, _ in rows)
    lp = torch.zeros(len(rows), T, dtype=F64)
    seg = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (toks, _) in enumerate(rows):
        for t, (v, s) in enumerate(toks):
            lp[i, t], seg[i, t] = v, s
    batch = objectives.SequenceBatch(
        input_ids=torch.arange(len(rows) * T).view(len(rows), T), attention_mask=torch.ones(len(rows), T, dtype=torch.long),
        response_mask=seg >= 0, segment_ids=seg, scores=objectives.scores_tensor([sc for _, sc in rows], 2).to(F64),
        aspects=("a", "b"),
    )
    return batch, lp


def test_ars_selects_best_of_group_and_masks_its_good_tokens():
    batch, lp = _rollout_batch([
        # prompt 0: sample 0 rewards (4, 0) → 2, sample 1 rewards (1) → 1: best is 0, baseline 1.5
        ([(-1.0, 0), (-2.0, 1)], [[4, 4], [0, 0]]),
        ([(-0.5, 0)], [[1, 1]]),
        # prompt 1: sample 2 reward 1, sample 3 rewards (3, 3) → 3: best is 3, baseline 2
        ([(-0.1, 0)], [[1, 1]]),
        ([(-0.3, 0), (-0.6, 0)], [[3, 3]]),
    ])
    cfg = LearnerConfig(schmitt_delta=0.1, ars_kl_coef=1.0)
    t = objectives.ars_targets(batch, W2, 2, cfg)
    assert t.rows.tolist() == [0, 3]
    assert t.baselines.tolist() == pytest.approx([1.5, 2.0])
    assert t.best_rewards.tolist() == pytest.approx([2.0, 3.0])
    assert t.keep_mask.tolist() == [[1, 0], [1, 1]]  # the winner's bad token is not imitated
    sub = objectives.select_rows(batch, t.rows)
    assert torch.equal(sub.input_ids, batch.input_ids[[0, 3]]) and sub.num_pairs == 0
    pol = lp[[0, 3]].clone().requires_grad_(True)
    # policy == reference: KL 0, loss = mean over prompts of the kept tokens' mean NLL
    loss, m = objectives.compute_ars_loss(pol, pol.detach(), t.keep_mask, sub.response_mask, cfg)
    assert float(loss.detach()) == pytest.approx((1.0 + 0.45) / 2, abs=1e-12)
    assert m["kl"] == pytest.approx(0.0) and m["mask_fraction"] == pytest.approx(3 / 4)
    loss.backward()
    assert pol.grad[0, 1].item() == 0.0  # the masked bad token gets no gradient
    # a reference 0.3 above the policy on every token: k3 KL e^{0.3} − 0.3 − 1 per token
    k3 = math.exp(0.3) - 0.3 - 1.0
    for coef in (1.0, 0.25):
        loss2, _ = objectives.compute_ars_loss(lp[[0, 3]], lp[[0, 3]] + 0.3, t.keep_mask, sub.response_mask,
                                               LearnerConfig(ars_kl_coef=coef))
        assert float(loss2) == pytest.approx((1.0 + 0.45) / 2 + coef * k3, abs=1e-12)


def test_ars_winner_no_better_than_its_group_trains_only_the_kl():
    batch, lp = _rollout_batch([([(-1.0, 0)], [[2, 2]]), ([(-1.0, 0)], [[2, 2]])])
    t = objectives.ars_targets(batch, W2, 2, LearnerConfig())
    assert t.keep_mask.sum().item() == 0
    loss, _ = objectives.compute_ars_loss(lp[t.rows], lp[t.rows], t.keep_mask, batch.response_mask[t.rows],
                                          LearnerConfig())
    assert float(loss) == 0.0


def test_ars_kl_coef_default_is_eq16s_unit_factor():
    assert LearnerConfig().ars_kl_coef == 1.0


# --------------------------------------------------------------------------- wiring


@pytest.mark.parametrize("algorithm", ["adpo", "ars"])
def test_new_algorithms_are_run_config_choices(algorithm):
    cfg = load_config(None, [f"algorithm={algorithm}"])
    assert cfg.algorithm == algorithm


def test_adpo_trains_through_the_pair_path_and_ars_through_groups():
    # The learner's train_round accepts every name of PREFERENCE_ALGORITHMS; ARS has its
    # own group method like APPO (it needs the K samples of a prompt).
    import inspect

    from actors import learner
    from jobs import driver

    assert "adpo" in objectives.PREFERENCE_ALGORITHMS and "ars" not in objectives.PREFERENCE_ALGORITHMS
    assert hasattr(learner.PolicyLearnerGroup, "train_ars") and hasattr(learner.LearnerRank, "train_ars")
    assert "train_ars" in inspect.getsource(driver.OnlineDriver.train)


def test_compare_methods_lists_kto_and_orpo():
    from benchmarks.compare_methods import METHODS

    assert METHODS["KTO"] == "kto" and METHODS["ORPO"] == "orpo"
