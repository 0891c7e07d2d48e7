"""The one metrics path: every round's metrics go to ``RUN_DIR/metrics.jsonl`` (one
JSON object per line), to wandb (offline unless ``WANDB_API_KEY`` is set) and to any
extra sinks (the driver adds Ray metrics), all with the same names.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from twodrl.metrics import round_metric_keys

Sink = Callable[[dict], None]

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.IGNORECASE)


def redact(obj: Any) -> Any:
    """A copy of a (nested) config with secret-looking values replaced. Fields that
    *name* an environment variable (``*_env``) are kept: they hold no secret."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if _SECRET_KEY.search(str(k)) and not str(k).endswith("_env") and v not in (None, ""):
                out[k] = "<redacted>"
            else:
                out[k] = redact(v)
        return out
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN; null means "not measured this round"
    if hasattr(value, "item"):
        return _json_safe(value.item())
    return value


def read_metrics(path: str | Path) -> list[dict]:
    """Lines of a metrics.jsonl; a torn last line (crash mid-write) is ignored."""
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(path: str | Path, last_round: int) -> None:
    """Keep only rounds ≤ ``last_round`` (the last checkpointed round), so a resumed
    run logs each round exactly once even if it crashed between logging and saving."""
    p = Path(path)
    if not p.exists():
        return
    keep = [r for r in read_metrics(p) if r.get("round", -1) <= last_round]
    tmp = p.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, p)


def wandb_mode(env: dict | None = None) -> str:
    """``online`` only when the user gave a key (``WANDB_API_KEY``), else ``offline``:
    runs never fail, or block on a login prompt, for lack of an account. An explicit
    ``WANDB_MODE`` (``online``, ``offline``, ``disabled``) always wins."""
    env = os.environ if env is None else env
    return env.get("WANDB_MODE") or ("online" if env.get("WANDB_API_KEY") else "offline")


EVAL_SAMPLES_KEY = "eval/samples"


def _ratings_text(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def eval_sample_table(records: Sequence[dict], aspects: Sequence[str]) -> tuple[list[str], list[list]]:
    """Columns and rows of the held-out samples table: per sample its id, prompt,
    response, the segments (JSON list) and, per aspect, the segment ratings in segment
    order (``"[3, 4, 2]"``; text, so responses of any length share one column type).
    ``records`` are the lines of ``RUN_DIR/samples/round-K.jsonl`` (``scores`` is
    segment × aspect)."""
    columns = ["id", "prompt", "response", "segments", *aspects]
    rows = []
    for r in records:
        scores = r.get("scores") or []
        per_aspect = [_ratings_text(seg[k] for seg in scores if k < len(seg)) for k in range(len(aspects))]
        rows.append([str(r.get("id", "")), r.get("prompt") or "", r.get("text") or "",
                     json.dumps(list(r.get("segments") or [])), *per_aspect])
    return columns, rows


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        aspects: Sequence[str],
        config: dict | None = None,
        use_wandb: bool = True,
        wandb_project: str = "twodrl",
        run_name: str | None = None,
        sinks: Iterable[Sink] = (),
        resume: bool = False,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.aspects = list(aspects)
        self.keys = round_metric_keys(self.aspects)
        self.sinks = list(sinks)
        self._wandb = None
        if use_wandb:
            self._wandb = self._start_wandb(config or {}, wandb_project, run_name, resume)

    def _start_wandb(self, config: dict, project: str, name: str | None, resume: bool):
        try:
            import wandb
        except ImportError:  # wandb is optional at run time
            return None
        mode = wandb_mode()
        return wandb.init(
            project=project,
            name=name,
            dir=str(self.run_dir),
            config=redact(config),
            mode=mode,
            resume="allow" if resume else None,
            id=(name if resume and name else None),
            reinit="finish_previous",
        )

    def log(self, metrics: dict) -> dict:
        """Log one round. Every standard key is present in every line (null when a
        stage did not run this round), plus whatever extra keys the round produced."""
        row = {k: None for k in self.keys}
        row.update({k: _json_safe(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=int(row.get("round") or 0))
        for sink in self.sinks:
            sink(row)
        return row

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """One table (e.g. the held-out samples of an eval) to wandb under ``key`` at
        ``step`` (the round). metrics.jsonl keeps numbers only, and the same rows are
        already in the run directory, so without wandb this does nothing."""
        if self._wandb is None:
            return
        import wandb

        self._wandb.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step=int(step))

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def plot_rewards(metrics_path: str | Path, out_png: str | Path, aspects: Sequence[str]) -> Path:
    """Per-aspect reward curves over rounds (on-policy samples and held-out eval)."""
    # A bare Figure, not pyplot: no global backend switch (matplotlib.use("Agg") here
    # would silence the inline plots of a notebook that runs rounds) and no GUI needed.
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, prefix, title in ((axes[0], "reward", "on-policy samples"), (axes[1], "eval/reward", "held-out prompts (greedy)")):
        rounds = [r["round"] for r in rows]
        for name in ["weighted", *aspects]:
            ys = [r.get(f"{prefix}/{name}") for r in rows]
            ys = [math.nan if y is None else y for y in ys]
            ax.plot(rounds, ys, marker="o", linewidth=2.5 if name == "weighted" else 1.2, label=name)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylim(0, 4.1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("rating (0–4)")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out
