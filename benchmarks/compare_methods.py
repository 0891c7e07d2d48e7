"""The methods side by side on the synthetic task.

    python -m benchmarks.compare_methods [--json PATH] [--seeds 0 1 2] [--rounds 3]
        [--experiments methods,controllable,dpa-directions,beta] [--signals rm,judge]
        [--set k=v ...]

Per seed, round 0 (SFT warm start of the policy + the first 2D reward model trained on
judge annotations) runs once; every experiment then starts from that round-0 state in the
same process, with the same actors: the learner reloads the round-0 DeepSpeed
checkpoint (weights, optimizer, scheduler), the rollout workers get its weights, the
prompt cursor and the RNGs are put back, the scorers reload the round-0 reward model
(it is fine-tuned online every round, so without this a run would inherit the reward
model the runs before it trained). So all methods of a seed see the same warm start,
reward model, prompts and rounds, and pay the start-up only once.

Signals (``--signals``): which ratings of the round's samples the methods train on.
``rm`` is the config as given (``configs/quickstart.yaml``: the reward model rates every
sample and the judge's ratings replace them on the ``annotator.fraction`` = 75 % it
audits); ``judge`` has the judge rate every sample (``annotator.fraction=1.0`` with
``annotator.judge_overrides_rm``), i.e. the synthetic task's ground truth, and skips
the reward model's online updates, which no training label depends on then;
``rm-only`` trains on the reward model's ratings alone (the judge only audits). Running
both from the same round-0 state separates what a loss does from how good the ratings
it is fed are. Runs of the ``rm`` signal keep the plain keys (``methods/DPO/seed=0``);
the others are keyed ``methods@judge/DPO/seed=0``. The DPA directions are measured with
the ``rm`` signal's DPA-RSF run.

Experiments
- ``methods``: DPO, IPO, KTO, ORPO, SimPO, TDPO (tdpo2), 1D-DPO, 2D-DPO, APPO, DPA-RSF.
- ``beta``: 2D-DPO with β ∈ {0.1, 0.2, 0.5, 0.7, 1.0} (β = the config's value is the
  ``methods`` run and is not repeated).
- ``controllable``: 2D-DPO with clarity-heavy [0.3,0.3,0.1,0.1,0.2] vs completeness-heavy
  [0.3,0.3,0.1,0.2,0.1] aspect weights (pair selection and the loss both use them).
- ``dpa-directions``: the round-0 policy and the DPA-RSF policy answer the eval prompts
  under fixed preference directions; judge-rated helpfulness and verbosity per direction.

The reference model of every preference method is the warm-started (round-0) policy,
as in the papers (π_ref = π_SFT), set on the learner ranks after round 0.

Evaluation is the driver's own: greedy answers to held-out prompts rated by the judge
(the task's ground truth). Results are cached per (experiment, signal, seed) in the JSON file,
written after every experiment, so an interrupted comparison resumes where it stopped.
Aggregation (mean, sample standard deviation over seeds; paired per-seed differences
with t-intervals) and the Markdown tables are pure functions of that JSON
(:func:`aggregate`, :func:`gains_over_warm_start`, :func:`paired_differences`,
:func:`markdown_table`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._setup import prepare_environment  # noqa: E402

prepare_environment()

from twodrl.diagnostics import BINS as CREDIT_BINS, credit_metric_keys  # noqa: E402

ASPECTS = ["helpfulness", "correctness", "safety", "completeness", "clarity"]
DEFAULT_WEIGHTS = [0.3, 0.4, 0.1, 0.1, 0.1]  # configs/quickstart.yaml
# Display name → config algorithm. TDPO is the paper's TDPO2 variant.
METHODS = {
    "DPO": "dpo",
    "IPO": "ipo",
    "KTO": "kto",
    "ORPO": "orpo",
    "SimPO": "simpo",
    "TDPO": "tdpo2",
    "1D-DPO": "1d-dpo",
    "2D-DPO": "2d-dpo",
    "APPO": "appo",
    "DPA-RSF": "dpa-rsf",
}
BETAS = [0.1, 0.2, 0.5, 0.7, 1.0]
CONTROL_WEIGHTS = {
    "clarity-heavy": [0.3, 0.3, 0.1, 0.1, 0.2],
    "completeness-heavy": [0.3, 0.3, 0.1, 0.2, 0.1],
}
# Directions (helpfulness, verbosity) at these angles: the DPA training range is
# [-π/4, 0]; +π/8 lies outside it (asks for *more* verbosity).
DIRECTION_ANGLES = [-math.pi / 4, -math.pi / 8, 0.0, math.pi / 8]
EXPERIMENTS = ("methods", "controllable", "dpa-directions", "beta")
# Signal → config values set on the driver for a run (None: the config's own value).
# Under ``judge`` every training label is the judge's, so the reward model's online
# fine-tuning (most of a round's time here) would change nothing the methods see: off.
SIGNALS = {
    "rm": {"annotator.fraction": None, "annotator.judge_overrides_rm": None, "scorer.update_every_rounds": None},
    "judge": {"annotator.fraction": 1.0, "annotator.judge_overrides_rm": True, "scorer.update_every_rounds": 0},
    # Every training label the reward model's; the judge's audit still fine-tunes it.
    "rm-only": {"annotator.fraction": None, "annotator.judge_overrides_rm": False, "scorer.update_every_rounds": None},
}
# Two-sided 95 % Student-t quantiles t_{0.975, df}, df = 1..30 (beyond: ~normal).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]

# Per-round values kept from the driver's metrics rows.
ROW_KEYS = (
    ["round", "eval/reward/weighted", "eval/mean_segments", "reward/weighted", "train/loss",
     "train/rewards/accuracies", "time/round_s"]
    + [f"eval/reward/{a}" for a in ASPECTS]
    + [f"reward/{a}" for a in ASPECTS]
    + [f"rm/agreement/{a}" for a in ASPECTS]
    + credit_metric_keys()
)


# --------------------------------------------------------------------------- pure helpers


def weighted_score(per_aspect: dict[str, float], weights: Sequence[float] = DEFAULT_WEIGHTS,
                   aspects: Sequence[str] = ASPECTS) -> float:
    """Σ_a w_a · score_a. Equal to the driver's weighted eval reward when every sample is
    rated on every aspect (the mean is linear); used to compare runs that trained with
    other weights on one common scale."""
    return float(sum(w * per_aspect[a] for w, a in zip(weights, aspects)))


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for a single value) and count, ignoring
    missing (None / NaN) values; (nan, nan, 0) when nothing is left."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def signal_experiment(experiment: str, signal: str = "rm") -> str:
    """The key prefix of an experiment's runs under a signal: the ``rm`` signal keeps
    the plain name, so JSON files from before the signal dimension read the same."""
    return experiment if signal == "rm" else f"{experiment}@{signal}"


def t_interval(values: Iterable[float | None]) -> tuple[float, float, float, int]:
    """Mean and two-sided 95 % Student-t interval (lo, hi) of the mean, and the count,
    ignoring missing values; lo = hi = mean for one value, all nan for none."""
    m, s, n = mean_std(values)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    if n == 1:
        return m, m, m, 1
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    half = t * s / math.sqrt(n)
    return m, m - half, m + half, n


def _seed_finals(runs: dict[str, dict], prefix: str) -> dict[str, dict[str, float]]:
    """``{seed: final_metrics}`` of the finished runs whose key starts with ``prefix``."""
    return {key.rsplit("=", 1)[1]: final_metrics(run["rows"]) for key, run in runs.items()
            if key.startswith(prefix) and run.get("rows")}


def gains_over_warm_start(runs: dict[str, dict], base: dict[str, dict], experiment: str,
                          names: Sequence[str], metric: str = "weighted") -> dict[str, tuple]:
    """Per name: the last round's ``metric`` minus the same seed's round-0 value, as a
    t-interval over the seeds (:func:`t_interval`). The difference is taken within a
    seed (same warm start, same prompts), so what a seed shifts for every method drops
    out; names with no finished run (or no round 0) are absent."""
    out = {}
    for name in names:
        finals = _seed_finals(runs, f"{experiment}/{name}/seed=")
        diffs = [f[metric] - final_metrics([base[s]["row"]])[metric] for s, f in sorted(finals.items())
                 if base.get(s, {}).get("row")]
        if diffs:
            out[name] = t_interval(diffs)
    return out


def paired_differences(runs: dict[str, dict], experiment: str, pairs: Sequence[tuple[str, str]],
                       metric: str = "weighted") -> dict[tuple[str, str], tuple]:
    """Per (a, b): the last round's ``metric`` of a minus b within each seed where both
    finished, as a t-interval over those seeds; pairs with no common seed are absent."""
    out = {}
    for a, b in pairs:
        fa = _seed_finals(runs, f"{experiment}/{a}/seed=")
        fb = _seed_finals(runs, f"{experiment}/{b}/seed=")
        diffs = [fa[s][metric] - fb[s][metric] for s in sorted(fa) if s in fb]
        if diffs:
            out[(a, b)] = t_interval(diffs)
    return out


def signal_differences(runs: dict[str, dict], experiment: str, names: Sequence[str], signal: str,
                       reference: str = "rm", metric: str = "weighted") -> dict[str, tuple]:
    """Per name: the last round's ``metric`` under ``signal`` minus under ``reference``,
    within each seed where both finished (same round-0 state), as a t-interval."""
    out = {}
    for name in names:
        fs = _seed_finals(runs, f"{signal_experiment(experiment, signal)}/{name}/seed=")
        fr = _seed_finals(runs, f"{signal_experiment(experiment, reference)}/{name}/seed=")
        diffs = [fs[s][metric] - fr[s][metric] for s in sorted(fs) if s in fr]
        if diffs:
            out[name] = t_interval(diffs)
    return out


def aspect_intervals(runs: dict[str, dict], experiment: str, name: str) -> dict[str, tuple]:
    """Per aspect (and ``weighted``): the last round's held-out rating of one method as
    a t-interval over seeds — the bars of :func:`plot_aspects`."""
    finals = list(_seed_finals(runs, f"{experiment}/{name}/seed=").values())
    return {m: t_interval(f[m] for f in finals) for m in [*ASPECTS, "weighted"]} if finals else {}


def fmt_ci(ci: tuple, digits: int = 2) -> str:
    """``mean [lo, hi]`` of a :func:`t_interval` (``mean`` alone for one value)."""
    m, lo, hi, n = ci
    if n == 0:
        return "–"
    return f"{m:+.{digits}f}" if n == 1 else f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def final_metrics(rows: Sequence[dict], weights: Sequence[float] = DEFAULT_WEIGHTS) -> dict[str, float]:
    """The last round's eval figures of one run, plus the weighted score under
    ``weights`` recomputed from its per-aspect means."""
    last = rows[-1]
    out = {a: last[f"eval/reward/{a}"] for a in ASPECTS}
    out["weighted"] = weighted_score(out, weights)
    out["segments"] = last.get("eval/mean_segments")
    return out


def aggregate(runs: dict[str, dict], experiment: str, names: Sequence[str],
              seeds: Optional[set[str]] = None) -> dict[str, dict]:
    """``{name: {metric: (mean, std, n)}}`` over seeds (all, or only ``seeds``) for the
    runs stored under ``runs[f"{experiment}/{name}/seed={s}"]``; names with no finished
    run are absent."""
    out: dict[str, dict] = {}
    for name in names:
        prefix = f"{experiment}/{name}/seed="
        finals = [final_metrics(run["rows"]) for key, run in sorted(runs.items())
                  if key.startswith(prefix) and run.get("rows")
                  and (seeds is None or key.rsplit("=", 1)[1] in seeds)]
        if not finals:
            continue
        out[name] = {m: mean_std(f[m] for f in finals) for m in finals[0]}
    return out


def paired(runs: dict[str, dict], base: dict[str, dict], experiment: str, names: Sequence[str]) -> dict[str, dict]:
    """Within-seed comparisons, which remove what a seed shifts for every method (its
    warm start, its reward model): per name, the gain of the last-round weighted score
    over the seed's round 0, and the rank among ``names`` (1 = best; ties share the
    mean rank) — each as (mean, std, n) over the seeds where every name finished."""
    seeds = sorted({k.rsplit("=", 1)[1] for k in runs if k.startswith(f"{experiment}/")})
    gains: dict[str, list[float]] = {n: [] for n in names}
    ranks: dict[str, list[float]] = {n: [] for n in names}
    for seed in seeds:
        finals = {}
        for n in names:
            run = runs.get(f"{experiment}/{n}/seed={seed}")
            if run and run.get("rows"):
                finals[n] = final_metrics(run["rows"])["weighted"]
        if len(finals) != len(names):
            continue  # a seed with missing methods would bias the ranks
        r0 = base.get(seed, {}).get("row")
        ordered = sorted(finals.values(), reverse=True)
        for n, v in finals.items():
            if r0:
                gains[n].append(v - final_metrics([r0])["weighted"])
            positions = [i + 1 for i, x in enumerate(ordered) if x == v]
            ranks[n].append(statistics.fmean(positions))
    return {n: {"gain": mean_std(gains[n]), "rank": mean_std(ranks[n])} for n in names if ranks[n]}


def curves(runs: dict[str, dict], experiment: str, name: str, base: dict[str, dict],
           relative: bool = False) -> tuple[list[int], list[tuple]]:
    """Weighted eval score per round (round 0 = the shared warm start of each seed):
    rounds and (mean, std, n) per round over seeds; ``relative``: minus the seed's
    round-0 score (the within-seed gain)."""
    prefix = f"{experiment}/{name}/seed="
    per_seed = []
    for key, run in sorted(runs.items()):
        if not key.startswith(prefix) or not run.get("rows"):
            continue
        seed = key.rsplit("=", 1)[1]
        r0 = base.get(seed, {}).get("row")
        rows = ([r0] if r0 else []) + run["rows"]
        scores = {r["round"]: weighted_score({a: r[f"eval/reward/{a}"] for a in ASPECTS}) for r in rows}
        if relative:
            if 0 not in scores:
                continue
            scores = {k: v - scores[0] for k, v in scores.items()}
        per_seed.append(scores)
    rounds = sorted({r for s in per_seed for r in s})
    return rounds, [mean_std(s.get(r) for s in per_seed) for r in rounds]


def fmt(ms: tuple[float, float, int], digits: int = 2) -> str:
    """``mean ± std`` (``mean`` alone for one seed, ``–`` when missing)."""
    mean, std, n = ms
    if n == 0:
        return "–"
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table; the first column is left-aligned, the rest right-aligned."""
    align = [":--"] + ["--:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def credit_table(runs: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Per experiment run (a method, a β of the 2D-DPO sweep, a weight setting), after
    the last round: the mean change of per-token log-prob of the probe's chosen and
    rejected segments by weighted-rating bin, the selectivity (top-bin chosen segments
    minus chosen segments rated below 2) and the slope of Δ against the rating, mean ±
    std over seeds."""
    cols = [f"{side}/{b}" for side in ("chosen", "rejected") for b in CREDIT_BINS] + ["selectivity", "slope"]
    groups: dict[str, list[dict]] = {}
    for key, run in sorted(runs.items()):
        if run.get("rows") and any(k.startswith("credit/") for k in run["rows"][-1]):
            groups.setdefault(key.rsplit("/seed=", 1)[0], []).append(run["rows"][-1])
    rows = []
    for name, lasts in groups.items():
        if not any(isinstance(r.get("credit/slope"), (int, float)) for r in lasts):
            continue
        rows.append([name, str(len(lasts))] + [fmt(mean_std(r.get(f"credit/{c}") for r in lasts), 3) for c in cols])
    return ["run", "n seeds"] + cols, rows


def plot_credit(data: dict, out_png: str | Path) -> Optional[Path]:
    """Δ log-prob per token by segment rating bin, one line per method (mean over
    seeds), chosen and rejected side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data.get("runs", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    drawn = False
    for name in METHODS:
        prefix = f"methods/{name}/seed="
        lasts = [run["rows"][-1] for key, run in sorted(runs.items()) if key.startswith(prefix) and run.get("rows")]
        if not lasts:
            continue
        for ax, side in zip(axes, ("chosen", "rejected")):
            means = [mean_std(r.get(f"credit/{side}/{b}") for r in lasts)[0] for b in CREDIT_BINS]
            if all(math.isnan(m) for m in means):
                continue
            ax.plot(range(len(CREDIT_BINS)), means, marker="o", label=name)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, side in zip(axes, ("chosen", "rejected")):
        ax.set_xticks(range(len(CREDIT_BINS)), CREDIT_BINS)
        ax.set_xlabel("segment's weighted rating (0–4)")
        ax.set_title(f"{side} segments of the held-out probe pairs")
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Δ log-prob per token vs the warm start")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, out_png)


def signals_of(runs: dict[str, dict], experiment: str = "methods") -> list[str]:
    """The signals (in :data:`SIGNALS` order) with at least one finished run of ``experiment``."""
    return [sig for sig in SIGNALS
            if any(k.startswith(signal_experiment(experiment, sig) + "/") and r.get("rows") for k, r in runs.items())]


PAIRED = [("2D-DPO", "DPO"), ("2D-DPO", "1D-DPO")]


def signal_tables(data: dict, names: Sequence[str] = tuple(METHODS)) -> str:
    """The loss-vs-signal tables: per method and signal, the gain of the held-out
    weighted score over the seed's round 0; the paired differences :data:`PAIRED` per
    signal; and per method the judge-minus-rm difference — all mean [95 % t-interval]
    over the paired per-seed differences."""
    runs, base = data.get("runs", {}), data.get("base", {})
    sigs = signals_of(runs)
    if not sigs:
        return ""
    parts = []
    gains = {sig: gains_over_warm_start(runs, base, signal_experiment("methods", sig), names) for sig in sigs}
    r0 = t_interval(final_metrics([b["row"]])["weighted"] for b in base.values() if b.get("row"))
    header = ["method"] + [h for sig in sigs for h in (f"n ({sig})", f"Δ weighted ({sig})")]
    rows = [[name] + [c for sig in sigs for c in ((str(gains[sig][name][3]), fmt_ci(gains[sig][name]))
                                                  if name in gains[sig] else ("0", "–"))]
            for name in names if any(name in gains[sig] for sig in sigs)]
    parts.append(f"Gain of the held-out weighted score (judge-rated) over the seed's round 0 (round 0: "
                 f"{r0[0]:.2f} [{r0[1]:.2f}, {r0[2]:.2f}] over {r0[3]} seeds), per signal the methods trained on; "
                 "mean [95 % t-interval] over the per-seed differences:\n\n" + markdown_table(header, rows))
    diffs = {sig: paired_differences(runs, signal_experiment("methods", sig), PAIRED) for sig in sigs}
    rows = [[f"{a} − {b}"] + [c for sig in sigs for c in ((str(diffs[sig][(a, b)][3]), fmt_ci(diffs[sig][(a, b)]))
                                                          if (a, b) in diffs[sig] else ("0", "–"))]
            for a, b in PAIRED]
    parts.append("Paired differences of the last-round weighted score within each seed, per signal:\n\n"
                 + markdown_table(["difference"] + [h for sig in sigs for h in (f"n ({sig})", f"Δ ({sig})")], rows))
    if "rm" in sigs and len(sigs) > 1:
        for sig in sigs[1:]:
            d = signal_differences(runs, "methods", names, sig)
            if d:
                rows = [[name, str(v[3]), fmt_ci(v)] for name, v in d.items()]
                parts.append(f"Same method, same seed: last-round weighted score with the {sig} signal minus "
                             "with the rm signal:\n\n" + markdown_table(["method", "n", f"{sig} − rm"], rows))
    return "\n\n".join(parts)


def plot_aspects(data: dict, out_png: str | Path, names: Sequence[str] = tuple(METHODS)) -> Optional[Path]:
    """Held-out ratings after the last round per aspect (and weighted), grouped bars
    per method with the round-0 warm start first, 95 % t-interval over seeds as error
    bars; one panel per signal. None when nothing finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, base = data.get("runs", {}), data.get("base", {})
    sigs = signals_of(runs)
    if not sigs:
        return None
    metrics = [*ASPECTS, "weighted"]
    r0 = [final_metrics([b["row"]]) for b in base.values() if b.get("row")]
    r0_ci = {m: t_interval(f[m] for f in r0) for m in metrics}
    fig, axes = plt.subplots(len(sigs), 1, figsize=(15, 4.2 * len(sigs)), sharey=True, squeeze=False)
    per_sig = {sig: {n: aspect_intervals(runs, signal_experiment("methods", sig), n) for n in names} for sig in sigs}
    # One slot and one colour per method across the panels, so a bar sits at the same
    # place in every signal's panel (empty where that run did not finish).
    shown = [n for n in names if any(per_sig[sig][n] for sig in sigs)]
    cmap = plt.get_cmap("tab20")
    for ax, sig in zip(axes[:, 0], sigs):
        groups = [("round 0", r0_ci)] + [(n, per_sig[sig][n]) for n in shown]
        width = 0.85 / len(groups)
        for j, (name, ci) in enumerate(groups):
            if not ci:
                continue
            xs = [i + (j - (len(groups) - 1) / 2) * width for i in range(len(metrics))]
            ys = [ci[m][0] for m in metrics]
            err = [[ci[m][0] - ci[m][1] for m in metrics], [ci[m][2] - ci[m][0] for m in metrics]]
            ax.bar(xs, ys, width, yerr=err, capsize=1.5, error_kw={"linewidth": 0.7},
                   color="lightgray" if name == "round 0" else cmap(j - 1),
                   edgecolor="black" if name == "2D-DPO" else None,
                   label=name)
        n_seeds = max((ci["weighted"][3] for _, ci in groups if ci), default=0)
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_ylim(0, 4.3)
        ax.set_ylabel("judge rating (0–4)")
        ax.set_title(f"signal: {sig} — held-out ratings after the last round, mean ± 95 % t-interval over "
                     f"≤ {n_seeds} seeds", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, ncol=len(groups), loc="upper center", bbox_to_anchor=(0.5, -0.07), frameon=False)
    fig.tight_layout()
    return _save_figure(fig, out_png)


def _save_figure(fig, out_png: str | Path, **savefig_kwargs) -> Path:
    """Write ``fig`` to ``out_png`` (creating its folder) and close it."""
    import matplotlib.pyplot as plt

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, **savefig_kwargs)
    plt.close(fig)
    return out


def read_samples(path: str | Path) -> dict[str, dict]:
    """``{id: record}`` of a driver's ``RUN_DIR/samples/round-K.jsonl``."""
    return {r["id"]: r for r in (json.loads(x) for x in Path(path).read_text().splitlines() if x.strip())}


def pick_example(before: dict[str, dict], after: dict[str, dict],
                 weights: Sequence[float] = DEFAULT_WEIGHTS) -> Optional[str]:
    """The held-out prompt to show before and after training: among prompts whose
    response changed, the one with the median change of the response's mean weighted
    segment rating (a typical case, not the best one); None when nothing changed."""
    def score(r):
        segs = r.get("scores") or []
        return statistics.fmean(sum(w * x for w, x in zip(weights, seg)) for seg in segs) if segs else math.nan

    deltas = sorted((score(after[i]) - score(before[i]), i) for i in before
                    if i in after and after[i].get("text") != before[i].get("text")
                    and not math.isnan(score(after[i]) - score(before[i])))
    return deltas[len(deltas) // 2][1] if deltas else None


def plot_heatmap(before: dict, after: dict, out_png: str | Path, aspects: Sequence[str] = ASPECTS,
                 titles: Sequence[str] = ("before (round 0)", "after")) -> Path:
    """One held-out prompt's responses as segment × aspect heatmaps of the judge's 0–4
    ratings, side by side, segment texts (shortened) as row labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [before, after]
    heights = [max(1, len(r.get("segments") or [])) for r in recs]
    fig, axes = plt.subplots(1, 2, figsize=(14, 1.8 + 0.45 * max(heights)), squeeze=False, layout="constrained")
    im = None
    for ax, rec, title in zip(axes[0], recs, titles):
        segs, scores = rec.get("segments") or [], rec.get("scores") or []
        grid = [[float(x) for x in row] for row in scores] or [[math.nan] * len(aspects)]
        im = ax.imshow(grid, vmin=0, vmax=4, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for k, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(k, i, f"{v:g}", ha="center", va="center", fontsize=8)
        labels = [(t[:38] + "…") if len(t) > 39 else t for t in (x.replace("\n", " ") for x in segs)]
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xticks(range(len(aspects)), aspects, fontsize=8, rotation=20)
        ax.set_title(f"{title}: {len(segs)} segments", fontsize=9)
    prompt = before.get("prompt") or ""
    short = prompt[:110] + ("…" if len(prompt) > 110 else "")
    fig.suptitle(f"held-out prompt {before.get('id', '')}: {short}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="judge rating")
    return _save_figure(fig, out_png, bbox_inches="tight")


def results_tables(data: dict) -> str:
    """All Markdown tables of a comparison JSON."""
    runs, base = data.get("runs", {}), data.get("base", {})
    parts = []
    cols = ["weighted", *ASPECTS, "segments"]
    header = ["method", "n seeds", "weighted", *ASPECTS, "segments"]
    b = {m: mean_std(final_metrics([s["row"]])[m] for s in base.values()) for m in cols} if base else {}
    rows = []
    if b:
        rows.append(["round 0 (SFT warm start)", str(b["weighted"][2]), *[fmt(b[c]) for c in cols]])
    agg = aggregate(runs, "methods", list(METHODS))
    rows += [[name, str(v["weighted"][2]), *[fmt(v[c]) for c in cols]] for name, v in agg.items()]
    parts.append("Methods (held-out eval, last round; weighted with the default weights):\n\n"
                 + markdown_table(header, rows))
    header_c, rows_c = credit_table(runs)
    if rows_c:
        parts.append("Segment credit after the last round (Δ log-prob per token of held-out probe segments since "
                     "the probe was drawn in round 0, by the segment's weighted rating; mean ± std over seeds):\n\n"
                     + markdown_table(header_c, rows_c))
    pair = paired(runs, base, "methods", list(METHODS))
    if pair:
        n = next(iter(pair.values()))["rank"][2]
        rows = [[name, fmt(v["gain"]), fmt(v["rank"], 1)] for name, v in pair.items()]
        parts.append(f"Methods within each seed ({n} seeds with every method): gain of the weighted score "
                     "over the seed's round 0, and rank among the methods (1 = best):\n\n"
                     + markdown_table(["method", "Δ weighted vs round 0", "rank"], rows))
    sig_tables = signal_tables(data)
    if sig_tables and any("@" in k for k in runs):
        parts.append(sig_tables)
    agg = aggregate(runs, "beta", [f"{x:g}" for x in BETAS])
    beta0 = data.get("config", {}).get("beta")
    # The β = beta0 point is the methods run, restricted to the seeds the sweep ran.
    sweep_seeds = {k.rsplit("=", 1)[1] for k in runs if k.startswith("beta/")}
    two_d = aggregate(runs, "methods", ["2D-DPO"], seeds=sweep_seeds).get("2D-DPO")
    if agg and beta0 is not None and two_d is not None:
        agg[f"{beta0:g} (the methods run)"] = two_d  # the methods run is the sweep's β = beta0 point
        agg = dict(sorted(agg.items(), key=lambda kv: float(kv[0].split()[0])))
    if agg:
        rows = [[f"β = {k}", str(v["weighted"][2]), *[fmt(v[c]) for c in cols]] for k, v in agg.items()]
        parts.append("2D-DPO β sweep:\n\n" + markdown_table(["β", "n seeds", "weighted", *ASPECTS, "segments"], rows))
    agg = aggregate(runs, "controllable", list(CONTROL_WEIGHTS))
    if agg:
        rows = [[f"{k} {CONTROL_WEIGHTS[k]}", str(v["weighted"][2]), *[fmt(v[c]) for c in cols]] for k, v in agg.items()]
        parts.append("Controllable 2D-DPO (aspect weights used for pair selection and the loss):\n\n"
                     + markdown_table(["weights", "n seeds", "weighted (default w)", *ASPECTS, "segments"], rows))
    # How far the reward model that picks the pairs agrees with the judge that grades
    # them: per run, the mean over its rounds of the per-segment exact-label agreement.
    # Only runs on the rm signal: under the judge signal the RM is neither used nor updated.
    per_run = [run["rows"] for run in runs.values() if run.get("rows") and "rm/agreement/clarity" in run["rows"][0]
               and run.get("signal", "rm") == "rm"]
    if per_run:
        cells = [fmt(mean_std(statistics.fmean(r[f"rm/agreement/{a}"] for r in rows) for rows in per_run))
                 for a in ASPECTS]
        parts.append("Reward model vs judge, share of audited segments with the same 0–4 label "
                     f"(mean ± std over {len(per_run)} runs):\n\n" + markdown_table(list(ASPECTS), [cells]))
    dirs = data.get("directions", {})
    if dirs:
        rows = []
        for policy in ("round0", "dpa-rsf"):
            for angle in DIRECTION_ANGLES:
                key = f"{angle:+.4f}"
                vals = [d[policy][key] for d in dirs.values() if policy in d and key in d[policy]]
                if not vals:
                    continue
                rows.append([policy, f"{math.degrees(angle):+.1f}°", str(len(vals)),
                             fmt(mean_std(v["helpfulness"] for v in vals)),
                             fmt(mean_std(v["verbosity"] for v in vals)),
                             fmt(mean_std(v["segments"] for v in vals))])
        parts.append("DPA directions v = (cos θ, sin θ) over (helpfulness, verbosity):\n\n"
                     + markdown_table(["policy", "θ", "n seeds", "helpfulness", "verbosity", "segments"], rows))
    return "\n\n".join(parts)


def plot(data: dict, out_png: str | Path) -> Path:
    """Four panels: weighted eval score per round per method (mean ± std over seeds);
    the 2D-DPO β sweep; per-aspect scores and length of the two controllable weight
    settings; helpfulness vs verbosity of the DPA directions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, base = data.get("runs", {}), data.get("base", {})
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0, 0]
    for j, name in enumerate(METHODS):
        rounds, stats = curves(runs, "methods", name, base, relative=True)
        if not rounds:
            continue
        m = [s[0] for s in stats]
        line, = ax.plot(rounds, m, marker="o", label=name, linewidth=2.4 if name == "2D-DPO" else 1.2)
        last = stats[-1]
        if last[2] > 1:  # spread at the last round only, offset so the bars stay readable
            ax.errorbar(rounds[-1] + 0.04 * (j - len(METHODS) / 2), last[0], yerr=last[1], color=line.get_color(),
                        capsize=2, linewidth=0.8)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_title("held-out weighted reward (judge): gain over the seed's round 0\nmean over seeds, ± std at the last round",
                 fontsize=10)
    ax.set_xlabel("round (0 = SFT warm start)")
    ax.set_ylabel("Δ weighted rating")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    pts = dict(aggregate(runs, "beta", [f"{x:g}" for x in BETAS]))
    sweep_seeds = {k.rsplit("=", 1)[1] for k in runs if k.startswith("beta/")}
    two_d = aggregate(runs, "methods", ["2D-DPO"], seeds=sweep_seeds).get("2D-DPO")
    beta0 = data.get("config", {}).get("beta")
    if two_d is not None and beta0 is not None:
        pts[f"{beta0:g}"] = two_d
    if pts:
        xs = sorted(pts, key=float)
        ax.errorbar([float(x) for x in xs], [pts[x]["weighted"][0] for x in xs],
                    yerr=[pts[x]["weighted"][1] if pts[x]["weighted"][2] > 1 else 0 for x in xs], marker="o", capsize=3)
        ax.set_xscale("log")
        ax.set_xticks([float(x) for x in xs], xs)
    ax.set_title("2D-DPO β sweep (last round)", fontsize=10)
    ax.set_xlabel("β")
    ax.set_ylabel("weighted rating (0–4)")
    ax.grid(alpha=0.3)

    ax = axes[1, 0]
    ctrl = aggregate(runs, "controllable", list(CONTROL_WEIGHTS))
    width = 0.8 / max(1, len(ctrl))
    for j, (name, v) in enumerate(ctrl.items()):
        xs = [i + j * width for i in range(len(ASPECTS) + 1)]
        ys = [v[a][0] for a in ASPECTS] + [v["segments"][0]]
        err = [v[a][1] if v[a][2] > 1 else 0 for a in ASPECTS] + [v["segments"][1] if v["segments"][2] > 1 else 0]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ASPECTS) + 1)], [*ASPECTS, "segments"], fontsize=8)
    ax.set_title("2D-DPO with clarity- vs completeness-heavy weights (last round)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    if ctrl:
        ax.legend(fontsize=8)

    ax = axes[1, 1]
    dirs = data.get("directions", {})
    for policy, marker in (("round0", "s"), ("dpa-rsf", "o")):
        hx, vy, labels = [], [], []
        for angle in DIRECTION_ANGLES:
            key = f"{angle:+.4f}"
            vals = [d[policy][key] for d in dirs.values() if policy in d and key in d[policy]]
            if vals:
                hx.append(statistics.fmean(v["verbosity"] for v in vals))
                vy.append(statistics.fmean(v["helpfulness"] for v in vals))
                labels.append(f"{math.degrees(angle):+.0f}°")
        if hx:
            ax.plot(hx, vy, marker=marker, label="round-0 policy" if policy == "round0" else "DPA-RSF policy")
            for x, y, t in zip(hx, vy, labels):
                ax.annotate(t, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_title("DPA: direction θ in the system prompt (eval prompts)", fontsize=10)
    ax.set_xlabel("verbosity (0–4)")
    ax.set_ylabel("helpfulness (0–4)")
    ax.grid(alpha=0.3)
    if dirs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, out_png)


# --------------------------------------------------------------------------- running


def _get_dotted(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_dotted(obj, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _keep(row: dict) -> dict:
    return {k: row.get(k) for k in ROW_KEYS}


def _set_on_ranks(learner, **attrs) -> None:
    """Set the learner ranks' copies of per-run settings (β, aspect weights) in place:
    the ranks read ``self.lc`` and ``self.weights`` at every step."""
    import ray

    def apply(rank, beta=None, weights=None):
        if beta is not None:
            rank.lc.beta = float(beta)
        if weights is not None:
            rank.weights = list(weights)
            rank.cfg.aspects.weights = list(weights)
        return True

    ray.get([r.__ray_call__.remote(apply, **attrs) for r in learner.ranks])


class Comparison:
    """One seed: a driver with its actors, the round-0 state, and experiments run from it."""

    def __init__(self, args, seed: int):
        from twodrl.config import load_config

        self.args = args
        self.seed = seed
        overrides = [
            f"seed={seed}", f"rounds={args.rounds}", "scheduling=sync", f"run_name=compare-s{seed}",
            "logging.wandb=false", "logging.plots=false", "logging.progress=false", "logging.keep_checkpoints=1",
            f"eval.num_prompts={args.eval_prompts}", *args.overrides,
        ]
        self.cfg = load_config(args.config, overrides)
        self.base_dir = Path(args.out_dir) / f"seed{seed}"
        self.driver = None

    def start(self) -> dict:
        from jobs.driver import OnlineDriver
        from twodrl.checkpoint import read_driver_state, round_dir

        t0 = time.perf_counter()
        self.driver = d = OnlineDriver(self.cfg, self.base_dir / "round0", progress=False)
        d.setup()
        row = d.run_round(0)
        self.ckpt = round_dir(d.run_dir, 0)
        # The reward model after round 0 (and the judge-rated rows it was fine-tuned
        # on): every run starts its online RM updates from these, as a fresh run would.
        self.rm0 = self.base_dir / "reward_model_round0"
        if (d.run_dir / "reward_model").is_dir():
            shutil.rmtree(self.rm0, ignore_errors=True)
            shutil.copytree(d.run_dir / "reward_model", self.rm0)
        self.rm_data0 = d.run_dir / "reward_model_data.jsonl"
        self.rm_data0 = self.rm_data0.read_text() if self.rm_data0.is_file() else None
        self.signal0 = {k: _get_dotted(self.cfg, k) for k in SIGNALS["rm"]}
        self.state0 = read_driver_state(self.ckpt, restore=False)
        # Every method starts from the warm-started policy (RUN_DIR/warmstart), which
        # the driver has already frozen as the reference; round 0's own preference
        # step is not part of any method's run.
        self.warmstart = d.run_dir / "warmstart"
        self.ref_is_sft = self.warmstart.is_dir()
        self.beta0 = self.cfg.learner.beta
        return {"row": _keep(row), "seconds": time.perf_counter() - t0, "reference": "sft" if self.ref_is_sft else "init"}

    def reset(self, name: str, algorithm: str, beta: float, weights: Sequence[float], signal: str = "rm") -> None:
        """Put learner, rollout workers, reward model, cursor and RNGs back to the
        round-0 state, and set the signal's annotator settings."""
        import random

        import ray

        from twodrl.checkpoint import read_driver_state
        from twodrl.rounds import PromptCursor
        from twodrl.tracking import MetricsLogger

        d = self.driver
        d.cfg.algorithm = algorithm
        d.cfg.learner.beta = beta
        d.cfg.aspects.weights = list(weights)
        d.weights = list(weights)
        for k, v in SIGNALS[signal].items():
            _set_dotted(d.cfg, k, self.signal0[k] if v is None else v)
        _set_on_ranks(d.learner, beta=beta, weights=weights)
        if self.rm0.is_dir():
            ray.get([s.load.remote(str(self.rm0)) for s in d.scorers])
        d.learner.load_checkpoint(str(self.warmstart))
        state = read_driver_state(self.ckpt, restore=True)  # python/torch RNGs back too
        d.cursor = PromptCursor.from_state(state["cursor"])
        d.planned_prompts = state.get("planned_prompts", 0)
        d.completed_prompts = state.get("completed_prompts", 0)
        d._directions = {}
        d._replay_rng = random.Random(self.seed + 1)
        d._pending = None
        d._sync_weights()
        if d.logger is not None:
            d.logger.finish()
        d.run_dir = self.base_dir / name.replace("/", "_")
        if (d.run_dir / "metrics.jsonl").exists():
            (d.run_dir / "metrics.jsonl").unlink()
        if self.rm_data0 is not None:
            d.run_dir.mkdir(parents=True, exist_ok=True)
            (d.run_dir / "reward_model_data.jsonl").write_text(self.rm_data0)
        d.logger = MetricsLogger(d.run_dir, d.aspects, use_wandb=False)

    def run(self, name: str, algorithm: str, beta: float | None = None, weights: Sequence[float] | None = None,
            signal: str = "rm") -> dict:
        beta = self.beta0 if beta is None else beta
        weights = list(DEFAULT_WEIGHTS if weights is None else weights)
        t0 = time.perf_counter()
        self.reset(name, algorithm, beta, weights, signal)
        # Sanity check of the reset: greedy eval of the restored policy must reproduce
        # the round-0 eval (same weights, same prompts, greedy decoding).
        reset_eval = self.driver.evaluate(0)["eval/reward/weighted"]
        rows = [_keep(self.driver.run_round(r)) for r in range(1, self.args.rounds + 1)]
        return {"algorithm": algorithm, "beta": beta, "weights": weights, "signal": signal, "rows": rows,
                "reset_eval_weighted": reset_eval, "seconds": time.perf_counter() - t0}

    def directions(self, angles: Sequence[float]) -> dict[str, dict]:
        """Greedy eval answers under fixed DPA directions, judge-rated, with the
        policy the rollout workers currently hold."""
        from twodrl.dpa import direction_system_prompt
        from twodrl.rounds import objective_values

        d = self.driver
        objectives = list(d.cfg.dpa.objectives)
        out = {}
        for angle in angles:
            v = [math.cos(angle), math.sin(angle)]
            system = direction_system_prompt(v, objectives)
            reqs = [{"id": f"dir{angle:+.3f}-{i}", "prompt": p.text, "system": system} for i, p in enumerate(d.eval_prompts)]
            groups, _ = d.rollout(reqs, n=1, greedy=True)
            samples = [g[0] for g in groups]
            judged, _ = d.annotate(samples)
            vals, segs = [], []
            for s, j in zip(samples, judged):
                if j is None:
                    continue
                s.segments, s.scores = j
                vals.append(objective_values(s, objectives, d.aspects))
                segs.append(len(s.segments))
            out[f"{angle:+.4f}"] = {
                objectives[k]: statistics.fmean(v[k] for v in vals) if vals else math.nan for k in range(len(objectives))
            } | {"segments": statistics.fmean(segs) if segs else math.nan, "n": len(vals)}
        return out

    def stop(self) -> None:
        import ray

        if self.driver is not None:
            self.driver.shutdown()
        ray.shutdown()


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}, "base": {}, "directions": {}}


def _save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def plan(experiments: Sequence[str], methods: Sequence[str], beta0: float,
         signals: Sequence[str] = ("rm",)) -> list[tuple[str, dict]]:
    """The (key, run kwargs) of every experiment run of one seed, in order; with more
    than one signal each run is followed by its twin under the next signal, so an
    interrupted seed leaves whole pairs."""
    if list(signals) != ["rm"]:
        return [(signal_experiment(k.split("/", 1)[0], sig) + "/" + k.split("/", 1)[1], dict(kw, signal=sig))
                for k, kw in plan(experiments, methods, beta0) for sig in signals]
    out = []
    for exp in experiments:
        if exp == "methods":
            out += [(f"methods/{m}", {"algorithm": METHODS[m]}) for m in methods]
        elif exp == "beta":
            out += [(f"beta/{b:g}", {"algorithm": "2d-dpo", "beta": b}) for b in BETAS if not math.isclose(b, beta0)]
        elif exp == "controllable":
            out += [(f"controllable/{k}", {"algorithm": "2d-dpo", "weights": w}) for k, w in CONTROL_WEIGHTS.items()]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="docs/figures/compare_methods.json", help="results (and resume cache)")
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=3, help="online rounds after round 0")
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--experiments", default=",".join(EXPERIMENTS), help=f"comma list of {EXPERIMENTS}")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--signals", default="rm", help=f"comma list of {list(SIGNALS)}: the ratings the methods train on")
    ap.add_argument("--out-dir", default="runs/compare_methods", help="run directories (metrics, checkpoints)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--plot", default="docs/figures/compare_methods.png")
    ap.add_argument("--credit-plot", default="docs/figures/segment_credit.png",
                    help="Δ log-prob by segment rating bin per method")
    ap.add_argument("--aspects-plot", default=None, help="per-aspect held-out ratings per method and signal (bars)")
    ap.add_argument("--heatmap", nargs=3, default=None, metavar=("BEFORE_JSONL", "AFTER_JSONL", "PNG"),
                    help="one held-out prompt's segment × aspect ratings before/after, from two samples files")
    ap.add_argument("--heatmap-label", default="last round", help="title of the heatmap's 'after' panel")
    ap.add_argument("--report-only", action="store_true", help="print the tables and plot from the JSON; run nothing")
    args = ap.parse_args(argv)
    experiments = [e.strip() for e in args.experiments.split(",") if e.strip()]
    bad = [e for e in experiments if e not in EXPERIMENTS]
    if bad:
        ap.error(f"--experiments: unknown {bad}; choose from {list(EXPERIMENTS)}")
    signals = [x.strip() for x in args.signals.split(",") if x.strip()]
    if not signals or any(x not in SIGNALS for x in signals):
        ap.error(f"--signals: choose from {list(SIGNALS)}")
    path = Path(args.json)
    data = _load(path)

    if not args.report_only:
        for seed in args.seeds:
            cmp = Comparison(args, seed)
            data.setdefault("config", {}).update({"file": args.config, "overrides": args.overrides, "rounds": args.rounds,
                                                  "eval_prompts": args.eval_prompts, "beta": cmp.cfg.learner.beta})
            todo = [(k, kw) for k, kw in plan(experiments, args.methods, cmp.cfg.learner.beta, signals)
                    if f"{k}/seed={seed}" not in data["runs"]]
            want_dirs = "dpa-directions" in experiments and not {"round0", "dpa-rsf"} <= set(data["directions"].get(str(seed), {}))
            if not todo and not want_dirs:
                continue
            try:
                data["base"][str(seed)] = cmp.start()
                _save(path, data)
                if want_dirs:
                    data["directions"].setdefault(str(seed), {})["round0"] = cmp.directions(DIRECTION_ANGLES)
                    _save(path, data)
                for key, kw in todo:
                    print(f"[compare] seed {seed}: {key}", flush=True)
                    data["runs"][f"{key}/seed={seed}"] = cmp.run(key, **kw)
                    _save(path, data)
                    if want_dirs and key == "methods/DPA-RSF":  # the rm signal's run
                        # The DPA-RSF policy is the one loaded right now.
                        data["directions"][str(seed)]["dpa-rsf"] = cmp.directions(DIRECTION_ANGLES)
                        _save(path, data)
                if want_dirs and "dpa-rsf" not in data["directions"][str(seed)]:
                    cmp.run("methods/DPA-RSF", "dpa-rsf")  # cached earlier: train it again to evaluate it
                    data["directions"][str(seed)]["dpa-rsf"] = cmp.directions(DIRECTION_ANGLES)
                    _save(path, data)
            finally:
                cmp.stop()

    tables = results_tables(data)
    print(tables)
    if args.plot and data.get("runs"):
        print(f"plot: {plot(data, args.plot)}")
    if args.aspects_plot and data.get("runs"):
        print(f"aspects plot: {plot_aspects(data, args.aspects_plot)}")
    if args.heatmap:
        before, after = read_samples(args.heatmap[0]), read_samples(args.heatmap[1])
        pid = pick_example(before, after)
        if pid is not None:
            out = plot_heatmap(before[pid], after[pid], args.heatmap[2], titles=("round 0 (warm start)", args.heatmap_label))
            print(f"heatmap ({pid}): {out}")
    if args.credit_plot and data.get("runs"):
        out = plot_credit(data, args.credit_plot)
        if out is not None:
            print(f"credit plot: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
