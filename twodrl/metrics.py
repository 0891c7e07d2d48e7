"""Metric names: the one list shared by metrics.jsonl, wandb, Ray metrics
(``twodrl_`` prefix, '/' → '_') and the Grafana dashboard.

Preference-training names follow TRL (``rewards/chosen``, ``logps/chosen`` …) under the
``train/`` prefix.
"""

from __future__ import annotations

import re
from typing import Sequence

from twodrl.aspects import DEFAULT_ASPECTS

RAY_PREFIX = "twodrl_"


def round_metric_keys(aspects: Sequence[str] = DEFAULT_ASPECTS) -> list[str]:
    """Every key present in every line of ``metrics.jsonl``."""
    keys = ["round", "reward/weighted"]
    keys += [f"reward/{a}" for a in aspects]
    keys += ["eval/reward/weighted"] + [f"eval/reward/{a}" for a in aspects]
    keys += [
        "train/loss",
        "train/rewards/chosen",
        "train/rewards/rejected",
        "train/rewards/margins",
        "train/rewards/accuracies",
        "train/logps/chosen",
        "train/logps/rejected",
        "train/kl",
        "time/round_s",
        "time/rollout_s",
        "time/score_s",
        "time/annotate_s",
        "time/train_s",
        "time/sync_s",
        "time/driver_overhead_s",
        "rollout/prompts",
        "rollout/prompts_planned",
        "rollout/samples",
        "rollout/tokens_per_s",
        "rollout/staleness_mean",
        "rollout/staleness_max",
        "annotate/requests",
        "annotate/failures",
        "annotate/cost_usd",
        "eval/win_rate",
        "recovery/learner_restarts",
        "recovery/rollout_restarts",
        "recovery/scorer_restarts",
        "recovery/annotator_restarts",
    ]
    keys += [f"rm/agreement/{a}" for a in aspects]
    keys += [f"rm/mae/{a}" for a in aspects]
    from twodrl.diagnostics import credit_metric_keys

    keys += credit_metric_keys()
    return keys


def ray_metric_name(key: str) -> str:
    """``reward/weighted`` → ``twodrl_reward_weighted`` (Prometheus-safe)."""
    return RAY_PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", key)
