"""The pure parts of the benchmark runner and the method comparison: aggregation over
seeds, weighted scores, round-time figures, throughput and table rendering."""

from __future__ import annotations

import math

import pytest

from benchmarks.__main__ import BENCHMARKS, format_value, render_table, summary_rows
from benchmarks.bench_rollout import tokens_per_second
from benchmarks.bench_rounds import STAGES, round_figures
from benchmarks.compare_methods import (
    ASPECTS,
    BETAS,
    DEFAULT_WEIGHTS,
    METHODS,
    aggregate,
    curves,
    final_metrics,
    fmt,
    markdown_table,
    mean_std,
    paired,
    paired_differences,
    gains_over_warm_start,
    pick_example,
    plan,
    plot_aspects,
    plot_heatmap,
    results_tables,
    signal_differences,
    signal_experiment,
    signal_tables,
    t_interval,
    weighted_score,
)


def _row(rnd: int, scores: list[float], segments: float = 3.0) -> dict:
    row = {"round": rnd, "eval/mean_segments": segments}
    row.update({f"eval/reward/{a}": s for a, s in zip(ASPECTS, scores)})
    return row


def test_mean_std_is_sample_std_and_skips_missing():
    m, s, n = mean_std([1.0, 2.0, None, 3.0, float("nan")])
    assert (m, n) == (2.0, 3)
    assert s == pytest.approx(1.0)  # sample (n-1) standard deviation of 1, 2, 3
    assert mean_std([5.0]) == (5.0, 0.0, 1)
    m, s, n = mean_std([None])
    assert n == 0 and math.isnan(m) and math.isnan(s)


def test_weighted_score_matches_weights():
    scores = dict(zip(ASPECTS, [4.0, 2.0, 0.0, 1.0, 3.0]))
    assert weighted_score(scores) == pytest.approx(0.3 * 4 + 0.4 * 2 + 0.1 * 0 + 0.1 * 1 + 0.1 * 3)
    clarity = [0.3, 0.3, 0.1, 0.1, 0.2]
    assert weighted_score(scores, clarity) == pytest.approx(0.3 * 4 + 0.3 * 2 + 0.1 * 1 + 0.2 * 3)


def test_final_metrics_uses_the_last_round():
    rows = [_row(1, [1, 1, 1, 1, 1], 2.0), _row(2, [2, 3, 4, 0, 1], 5.0)]
    f = final_metrics(rows)
    assert f["correctness"] == 3 and f["segments"] == 5.0
    assert f["weighted"] == pytest.approx(weighted_score(dict(zip(ASPECTS, [2, 3, 4, 0, 1]))))


def test_aggregate_over_seeds_per_method():
    runs = {
        "methods/DPO/seed=0": {"rows": [_row(1, [0] * 5), _row(2, [1, 1, 1, 1, 1])]},
        "methods/DPO/seed=1": {"rows": [_row(1, [0] * 5), _row(2, [3, 3, 3, 3, 3])]},
        "methods/2D-DPO/seed=0": {"rows": [_row(1, [2, 2, 2, 2, 2])]},
        "methods/IPO/seed=0": {"rows": []},  # started, nothing finished: left out
        "beta/0.5/seed=0": {"rows": [_row(1, [4] * 5)]},  # another experiment
    }
    agg = aggregate(runs, "methods", list(METHODS))
    assert set(agg) == {"DPO", "2D-DPO"}
    mean, std, n = agg["DPO"]["weighted"]
    assert (mean, n) == (pytest.approx(2.0), 2)
    assert std == pytest.approx(math.sqrt(2.0))
    assert agg["2D-DPO"]["clarity"] == (2.0, 0.0, 1)


def test_curves_prepend_each_seeds_round0():
    base = {"0": {"row": _row(0, [1] * 5)}, "1": {"row": _row(0, [3] * 5)}}
    runs = {"methods/DPO/seed=0": {"rows": [_row(1, [2] * 5)]}, "methods/DPO/seed=1": {"rows": [_row(1, [4] * 5)]}}
    rounds, stats = curves(runs, "methods", "DPO", base)
    assert rounds == [0, 1]
    assert stats[0][0] == pytest.approx(2.0) and stats[1][0] == pytest.approx(3.0)
    assert stats[1][2] == 2


def test_plan_skips_the_beta_of_the_methods_run():
    keys = [k for k, _ in plan(["methods", "beta", "controllable"], list(METHODS), beta0=0.2)]
    assert keys[: len(METHODS)] == [f"methods/{m}" for m in METHODS]
    assert "beta/0.2" not in keys and {f"beta/{b:g}" for b in BETAS if b != 0.2} <= set(keys)
    assert {"controllable/clarity-heavy", "controllable/completeness-heavy"} <= set(keys)
    kw = dict(plan(["methods"], ["TDPO", "APPO"], 0.2))
    assert kw == {"methods/TDPO": {"algorithm": "tdpo2"}, "methods/APPO": {"algorithm": "appo"}}


def test_markdown_tables_render():
    t = markdown_table(["method", "x"], [["DPO", "1.00 ± 0.10"]])
    assert t.splitlines() == ["| method | x |", "| :-- | --: |", "| DPO | 1.00 ± 0.10 |"]
    assert fmt((1.234, 0.5, 3)) == "1.23 ± 0.50" and fmt((1.234, 0.0, 1)) == "1.23" and fmt((math.nan, math.nan, 0)) == "–"
    data = {"base": {"0": {"row": _row(0, [1] * 5)}},
            "runs": {"methods/DPO/seed=0": {"rows": [_row(1, [2] * 5)]},
                     "controllable/clarity-heavy/seed=0": {"rows": [_row(1, [2, 2, 2, 2, 4])]}}}
    text = results_tables(data)
    assert "| round 0 (SFT warm start) | 1 | 1.00 |" in text
    assert "| DPO | 1 | 2.00 |" in text
    assert "clarity-heavy [0.3, 0.3, 0.1, 0.1, 0.2]" in text
    assert sum(DEFAULT_WEIGHTS) == pytest.approx(1.0)


def _timing_row(round_s: float, overhead: float, **stages: float) -> dict:
    row = {"time/round_s": round_s, "time/driver_overhead_s": overhead}
    row.update({f"time/{s}_s": stages.get(s, 0.0) for s in STAGES})
    return row


def test_round_figures():
    sync = [_timing_row(10.0, 0.2, rollout=4.0, score=1.0, train=3.0, eval=1.8),
            _timing_row(12.0, 0.4, rollout=6.0, score=1.0, train=3.0, eval=1.6)]
    overlap = [_timing_row(7.0, 2.0, rollout=6.5, train=3.0, eval=1.0), _timing_row(5.0, 0.1, rollout=3.0, train=4.5)]
    f = round_figures(sync, overlap)
    assert f["sync_round_s"] == 11.0 and f["overlap_round_s"] == 6.0
    assert f["longest_stage"] == "rollout" and f["max_stage_s"] == 5.0
    assert f["overlap_bound_s"] == pytest.approx((6.5 + 4.5) / 2)  # per round: max(rollout, the rest)
    assert f["overlap_over_max_stage"] == pytest.approx(1.2)
    assert f["driver_overhead_frac"] == pytest.approx(0.3 / 11.0) and f["driver_overhead_target_met"]
    assert "stream_round_s" not in f
    stream = [dict(_timing_row(5.5, 0.1, rollout=3.0, train=3.0), **{"rollout/staleness_max": 1.0}),
              dict(_timing_row(6.0, 0.1, rollout=3.0, train=3.0), **{"rollout/staleness_max": 0.0})]
    g = round_figures(sync, overlap, stream)
    assert g["stream_round_s"] == pytest.approx(5.75) and g["stream_target_met"]  # 5.75 ≤ 1.15 × 5
    assert g["stream_speedup"] == pytest.approx(11.0 / 5.75) and g["stream_staleness_max"] == 1.0
    with pytest.raises(ValueError):
        round_figures(sync, [])


def test_tokens_per_second_uses_the_median_call():
    assert tokens_per_second([100, 100, 100], [1.0, 4.0, 2.0]) == pytest.approx(50.0)
    assert tokens_per_second([90], [3.0]) == pytest.approx(30.0)
    with pytest.raises(ValueError):
        tokens_per_second([1, 2], [1.0])


def test_summary_rows_check_targets_and_render():
    results = {
        "rounds": {"sync_round_s": 10.0, "overlap_round_s": 6.0, "stream_round_s": 6.0, "max_stage_s": 5.5,
                   "stream_over_max_stage": 6.0 / 5.5, "stream_speedup_slow_judge": 1.4,
                   "driver_overhead_frac": 0.07},
        "annotate": {"rps_c1": 4.9, "rps_c16": 70.0, "speedup": 14.3},
    }
    rows = summary_rows(results)
    by_key = {(r["benchmark"], r["key"]): r for r in rows}
    assert by_key["rounds", "stream_over_max_stage"]["status"] == "ok"  # 6.0 ≤ 1.15 × 5.5
    assert by_key["rounds", "stream_speedup_slow_judge"]["status"] == "MISS"
    assert by_key["rounds", "driver_overhead_frac"]["status"] == "MISS"
    assert by_key["rounds", "sync_round_s"]["status"] == "-"
    assert by_key["annotate", "speedup"]["status"] == "ok"
    assert {r["benchmark"] for r in rows} == {"rounds", "annotate"}  # absent benchmarks: no rows
    assert len(rows) == sum(len(b.figures) for b in BENCHMARKS if b.name in results)
    rows.append({**rows[0], "key": "x", "value": None, "status": "missing"})
    text = render_table(rows).splitlines()
    assert text[0].split() == ["benchmark", "figure", "value", "unit", "target", "status"]
    assert len(text) == len(rows) + 2
    assert format_value(0.07) == "0.07" and format_value(2.5e-9) == "2.50e-09" and format_value(1922.4) == "1922"


def test_paired_gains_and_ranks_within_seed():
    base = {"0": {"row": _row(0, [1] * 5)}, "1": {"row": _row(0, [3] * 5)}}
    runs = {
        "methods/DPO/seed=0": {"rows": [_row(1, [2] * 5)]},     # +1, best of seed 0
        "methods/IPO/seed=0": {"rows": [_row(1, [0] * 5)]},     # -1
        "methods/DPO/seed=1": {"rows": [_row(1, [2] * 5)]},     # -1, tied
        "methods/IPO/seed=1": {"rows": [_row(1, [2] * 5)]},     # -1, tied
        "methods/DPO/seed=2": {"rows": [_row(1, [4] * 5)]},     # seed 2 lacks IPO: left out
    }
    out = paired(runs, base, "methods", ["DPO", "IPO"])
    assert out["DPO"]["gain"][0] == pytest.approx(0.0) and out["DPO"]["gain"][2] == 2
    assert out["IPO"]["gain"][0] == pytest.approx(-1.0)
    assert out["DPO"]["rank"][0] == pytest.approx((1 + 1.5) / 2)  # ties share the mean rank
    assert out["IPO"]["rank"][0] == pytest.approx((2 + 1.5) / 2)


def test_t_interval_uses_student_t():
    m, lo, hi, n = t_interval([1.0, 2.0, 3.0, None])
    assert (m, n) == (2.0, 3)
    half = 4.303 * 1.0 / math.sqrt(3)  # t_{0.975, 2} · s / √n
    assert (lo, hi) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    assert t_interval([5.0]) == (5.0, 5.0, 5.0, 1)
    assert t_interval([])[3] == 0 and math.isnan(t_interval([])[0])
    m, lo, hi, n = t_interval([0.0, 1.0] * 30)  # df 59 > the table: normal quantile
    assert hi - m == pytest.approx(1.96 * math.sqrt(60 / 59 * 0.25) / math.sqrt(60))


def _signal_data() -> dict:
    # Seeds 0..2 with round 0 at 1, 2, 3 (weighted = the constant score).
    base = {str(s): {"row": _row(0, [1 + s] * 5)} for s in range(3)}
    runs = {}
    for s in range(3):
        runs[f"methods/DPO/seed={s}"] = {"rows": [_row(1, [1.5 + s] * 5)]}          # rm: +0.5
        runs[f"methods/2D-DPO/seed={s}"] = {"rows": [_row(1, [1.5 + s + 0.1 * s] * 5)]}  # rm: +0.5, +0.6, +0.7
        runs[f"methods@judge/DPO/seed={s}"] = {"rows": [_row(1, [2 + s] * 5)]}      # judge: +1
        if s < 2:  # seed 2's judge 2D-DPO did not finish: left out of its pairs
            runs[f"methods@judge/2D-DPO/seed={s}"] = {"rows": [_row(1, [2.5 + s] * 5)]}
    return {"base": base, "runs": runs}


def test_gains_and_paired_differences_are_within_seed():
    data = _signal_data()
    runs, base = data["runs"], data["base"]
    g = gains_over_warm_start(runs, base, "methods", ["DPO", "2D-DPO", "APPO"])
    assert set(g) == {"DPO", "2D-DPO"}  # APPO never ran
    assert g["DPO"][:2] == (pytest.approx(0.5), pytest.approx(0.5)) and g["DPO"][3] == 3  # no spread: zero width
    assert g["2D-DPO"][0] == pytest.approx(0.6) and g["2D-DPO"][1] < 0.6 < g["2D-DPO"][2]
    gj = gains_over_warm_start(runs, base, signal_experiment("methods", "judge"), ["2D-DPO"])
    assert gj["2D-DPO"][0] == pytest.approx(1.5) and gj["2D-DPO"][3] == 2
    d = paired_differences(runs, "methods", [("2D-DPO", "DPO"), ("2D-DPO", "IPO")])
    assert set(d) == {("2D-DPO", "DPO")}
    assert d[("2D-DPO", "DPO")][0] == pytest.approx(0.1) and d[("2D-DPO", "DPO")][3] == 3
    dj = paired_differences(runs, "methods@judge", [("2D-DPO", "DPO")])
    assert dj[("2D-DPO", "DPO")][0] == pytest.approx(0.5) and dj[("2D-DPO", "DPO")][3] == 2
    sd = signal_differences(runs, "methods", ["DPO", "2D-DPO"], "judge")
    assert sd["DPO"][0] == pytest.approx(0.5) and sd["DPO"][3] == 3
    assert sd["2D-DPO"][0] == pytest.approx(((2.5 - 1.5) + (3.5 - 2.6)) / 2) and sd["2D-DPO"][3] == 2


def test_plan_pairs_each_run_with_its_signal_twin():
    out = plan(["methods"], ["DPO", "2D-DPO"], 0.2, signals=["rm", "judge"])
    assert [k for k, _ in out] == ["methods/DPO", "methods@judge/DPO", "methods/2D-DPO", "methods@judge/2D-DPO"]
    assert out[1][1] == {"algorithm": "dpo", "signal": "judge"}
    assert plan(["methods"], ["DPO"], 0.2) == [("methods/DPO", {"algorithm": "dpo"})]  # the old keys and kwargs
    assert signal_experiment("beta", "rm") == "beta" and signal_experiment("beta", "judge") == "beta@judge"


def test_signal_tables_render_and_plots_draw(tmp_path):
    data = _signal_data()
    text = signal_tables(data, ["DPO", "2D-DPO", "1D-DPO"])
    assert "| DPO | 3 | +0.50 [+0.50, +0.50] | 3 | +1.00 [+1.00, +1.00] |" in text
    assert "| 2D-DPO − 1D-DPO | 0 | – | 0 | – |" in text
    assert "| 1D-DPO |" not in text.split("Paired")[0]  # never ran: no row
    assert "judge − rm" in text and text in results_tables(data)
    assert plot_aspects(data, tmp_path / "a.png").stat().st_size > 0
    assert plot_aspects({"runs": {}}, tmp_path / "none.png") is None


def test_heatmap_example_is_the_median_change(tmp_path):
    def rec(i, text, ratings):
        return {"id": i, "prompt": f"p{i}", "text": text, "segments": [text] * len(ratings),
                "scores": [[r] * 5 for r in ratings]}

    before = {i: rec(i, "old", [2]) for i in "abcd"}
    after = {"a": rec("a", "new", [4]), "b": rec("b", "new", [3]), "c": rec("c", "new", [1, 1]),
             "d": rec("d", "old", [2])}  # d unchanged: not a candidate
    assert pick_example(before, after) == "b"  # changes -1, +1, +2: the median is +1
    assert pick_example(before, {"d": before["d"]}) is None
    assert plot_heatmap(before["c"], after["c"], tmp_path / "h.png").stat().st_size > 0
