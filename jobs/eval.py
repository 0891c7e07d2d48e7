"""``twodrl eval``: judge one policy checkpoint on a prompt set, and optionally against
a baseline checkpoint, the way the online job evaluates its rounds.

    twodrl eval --model RUN_DIR --round 3 --baseline RUN_DIR --baseline-round 0 \\
        --prompts my_prompts.jsonl --judge-url http://127.0.0.1:8011/v1 --json out.json

A model is a Hugging Face directory, a name the loaders resolve (``tiny:policy``, a hub
name), or a run directory with ``--round K`` (its round checkpoint's policy; without
``--round`` the newest one). Answers are greedy, from the project's vLLM rollout workers
(one model at a time, so two models never share an accelerator); each answer is rated
per aspect by the judge (single-response mode, as the online job's ``eval/reward/*``),
and each prompt's pair of answers is judged side by side in both orders, the outcomes
giving a win rate with a bootstrap 95% interval (:mod:`twodrl.evaluation`, the same
functions the online job's ``eval/win_rate`` uses).

Settings a run would take from its config (aspects and weights, ``policy.max_length``,
``eval.max_new_tokens``, the rollout worker's resources, the annotator's limits) come
from ``--config`` (default: the model's run directory's ``config.yaml`` when it has one,
else the built-in defaults) and ``--set``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from twodrl.config import ConfigError, RunConfig, load_config

PROMPT_SETS = ("synthetic",)


class EvalError(ValueError):
    """A model, prompt set or option the evaluation cannot use (exit code 2)."""


# --------------------------------------------------------------------------- pure parts


def _round_dirs(run_dir: Path) -> dict[int, Path]:
    """Complete round checkpoints of a run, read only: a live run's temporary
    directories are left alone (``latest_checkpoint`` would sweep them)."""
    from twodrl.checkpoint import checkpoint_root

    out = {}
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for child in root.iterdir():
            name = child.name
            if name.startswith("round-") and name[6:].isdigit() and (child / "driver.json").is_file():
                out[int(name[6:])] = child
    return out


def resolve_checkpoint(path: str, round_idx: Optional[int] = None) -> str:
    """The policy directory to load for ``path``: a Hugging Face directory as is; a run
    directory's round ``round_idx`` (default: the newest) as its checkpoint's
    ``learner/policy`` (a LoRA run's adapter, merged once into ``RUN_DIR/merged/``);
    anything that is not a directory (``tiny:policy``, a hub name) unchanged, for the
    model loaders to resolve."""
    from actors.learner import HF_SUBDIR

    p = Path(path)
    if (p / "config.json").is_file():
        if round_idx is not None:
            raise EvalError(f"{path}: a model directory has no rounds; --round applies to run directories")
        return str(p)
    if p.is_dir():
        rounds = _round_dirs(p)
        if not rounds:
            raise EvalError(f"{path}: neither a model directory (no config.json) nor a run directory with round "
                            "checkpoints (checkpoints/round-NNNN)")
        k = max(rounds) if round_idx is None else round_idx
        if k not in rounds:
            raise EvalError(f"{path}: no checkpoint of round {k}; kept rounds: {sorted(rounds)} "
                            "(logging.keep_checkpoints keeps only the newest)")
        policy = rounds[k] / "learner" / HF_SUBDIR
        if not (policy / "config.json").is_file() and (policy.parent / "adapter").is_dir():
            # learner.lora checkpoints hold the adapter (and any folds), not a full model:
            # merge it once into RUN_DIR/merged/round-NNNN, outside the checkpoint.
            merged = p / "merged" / rounds[k].name
            if not (merged / "config.json").is_file():
                from twodrl.models.lora import merge_checkpoint

                print(f"[twodrl] eval: merging round {k}'s LoRA adapter into {merged}", flush=True)
                merge_checkpoint(policy.parent, merged)
            return str(merged)
        if not (policy / "config.json").is_file():
            raise EvalError(f"{path}: round {k}'s checkpoint has no policy at {policy}")
        return str(policy)
    if round_idx is not None or os.sep in path or path.startswith("."):
        raise EvalError(f"{path}: no such directory")
    return path


def _run_dir_config(path: str) -> Optional[Path]:
    p = Path(path)
    return p / "config.yaml" if p.is_dir() and (p / "config.yaml").is_file() else None


def summarize(samples: Sequence[dict], weights: Sequence[float], aspects: Sequence[str]) -> dict[str, float]:
    """Per-aspect and weighted judge ratings (0–4, over the answers the judge rated),
    mean segments and mean length of the answers (tokens and characters, over all)."""
    from twodrl.rounds import ScoredSample, reward_summary

    judged = [ScoredSample(s["id"], s["prompt"], s["text"], s["segments"], s["scores"])
              for s in samples if s.get("scores") is not None]
    out: dict[str, float] = dict(reward_summary(judged, weights, aspects, prefix="reward"))
    n = max(len(samples), 1)
    out["mean_segments"] = sum(len(s["segments"]) for s in samples) / n
    out["mean_tokens"] = sum(s.get("num_tokens", 0) for s in samples) / n
    out["mean_chars"] = sum(len(s["text"]) for s in samples) / n
    out["judged"] = float(len(judged))
    out["judge_failures"] = float(len(samples) - len(judged))
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def markdown_report(report: dict) -> str:
    """The report as Markdown: one row per model, then the win rate line."""
    aspects = report["aspects"]
    head = ["model", "weighted", *aspects, "segments", "tokens", "judged"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join([":--"] + ["--:"] * (len(head) - 1)) + " |"]
    for role in ("model", "baseline"):
        m = report.get(role)
        if not m:
            continue
        s = m["summary"]
        cells = [f"{role}: `{m['path']}`", _fmt(s["reward/weighted"]), *(_fmt(s[f"reward/{a}"]) for a in aspects),
                 _fmt(s["mean_segments"], 2), _fmt(s["mean_tokens"], 1), f"{int(s['judged'])}/{report['num_prompts']}"]
        lines.append("| " + " | ".join(cells) + " |")
    wr = report.get("win_rate")
    if wr:
        lines.append("")
        lines.append(f"Win rate of the model against the baseline (each pair judged in both orders, ties ½): "
                     f"**{_fmt(wr['win_rate'])}**, 95% bootstrap interval [{_fmt(wr['win_rate_ci_low'])}, "
                     f"{_fmt(wr['win_rate_ci_high'])}] over {int(wr['win_rate_pairs'])} prompts"
                     f" ({int(wr['win_rate_failures'])} not judged).")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the job


def load_prompt_set(source: str, cfg: RunConfig, limit: Optional[int], split: str = "train") -> list:
    """``synthetic``: the embedded task's held-out eval prompts; anything else: a prompt
    dataset :func:`twodrl.tasks.load_prompts` reads (``split`` for saved ``datasets``
    directories and hub names; ``task.prompt_field`` / ``task.messages_field`` apply)."""
    from twodrl.tasks import SyntheticTask, load_prompts

    if source == "synthetic":
        prompts = SyntheticTask(seed=cfg.seed).eval
    else:
        t = cfg.task
        prompts = load_prompts(source, split=split, prompt_field=t.prompt_field,
                               messages_field=t.messages_field, id_prefix="eval")
    return prompts[:limit] if limit else prompts


class Evaluator:
    """Ray-side machinery of one evaluation: rollout workers per model, annotators."""

    def __init__(self, cfg: RunConfig, judge_url: str):
        from actors.annotator import create_annotators
        from actors.common import run_namespace
        from jobs.driver import connect_ray

        self.cfg = cfg
        self.namespace = f"{run_namespace(cfg)}-{os.getpid()}"
        self._own_ray = not __import__("ray").is_initialized()
        connect_ray(cfg, self.namespace)
        self.annotators = create_annotators(cfg, self.namespace, base_url=judge_url)

    def generate(self, model_path: str, requests: list[dict]) -> list[dict]:
        """Greedy answers of ``model_path``, one per request, by the rollout workers."""
        import ray

        from actors.rollout import create_rollout_workers
        from actors.workqueue import run_work_queue
        from jobs.driver import _wait_names_free

        cfg = dataclasses.replace(self.cfg, policy=dataclasses.replace(self.cfg.policy, path=model_path))
        workers = create_rollout_workers(cfg, self.namespace)
        try:
            results = run_work_queue(
                workers, requests, method="generate",
                kwargs={"n": 1, "greedy": True, "max_new_tokens": cfg.eval.max_new_tokens},
                chunk_size=max(1, -(-len(requests) // len(workers))),
            )
        finally:
            for w in workers:
                ray.kill(w, no_restart=True)
            # The next model's workers take the same names.
            _wait_names_free([f"rollout-{i}" for i in range(len(workers))], self.namespace)
        by_id = {r["id"]: r for r in results}
        out = []
        for req in requests:
            s = by_id[req["id"]]["samples"][0]
            out.append({"id": req["id"], "prompt": req["prompt"], "history": req.get("history"),
                        "text": s["text"], "num_tokens": len(s.get("token_ids") or [])})
        return out

    def _judge(self, items: list[dict], method: str) -> list[dict]:
        from actors.workqueue import run_work_queue

        chunk = max(1, min(self.cfg.annotator.concurrency, -(-len(items) // len(self.annotators))))
        return run_work_queue(self.annotators, items, method=method, chunk_size=chunk)

    def rate(self, samples: list[dict]) -> None:
        """Segments and per-aspect judge ratings ``[S][A]`` of each answer, in place
        (``scores`` None where the judge failed; its segments are then the segmenter's)."""
        from twodrl.annotation.records import segment_text

        results = self._judge([{"id": str(i), "prompt": s["prompt"], "response": s["text"], "history": s["history"]}
                               for i, s in enumerate(samples)], "annotate_responses")
        for r in results:
            s = samples[int(r["id"])]
            s["segments"] = list(r.get("segments") or segment_text(s["text"]))
            s["scores"] = r.get("scores")
            if r.get("error"):
                s["error"] = r["error"]

    def judge_pairs(self, items: list[dict]) -> list[Optional[list[dict]]]:
        results = self._judge([dict(item, id=str(i)) for i, item in enumerate(items)], "annotate_pairs")
        rated: list[Optional[list[dict]]] = [None] * len(items)
        for r in results:
            if r.get("scores") is not None:
                rated[int(r["id"])] = r["scores"]
        return rated

    def shutdown(self) -> None:
        import ray

        for a in self.annotators:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - best effort on teardown
                pass
        if self._own_ray:
            ray.shutdown()


def evaluate(cfg: RunConfig, model: str, baseline: Optional[str], prompts: list, judge_url: str,
             judge_label: str, prompt_source: str) -> dict:
    """Generate, rate, compare; returns the report (see :func:`markdown_report`)."""
    from twodrl.evaluation import both_order_items, both_order_outcomes, weighted_rating, win_rate

    aspects, weights = list(cfg.aspects.names), list(cfg.aspects.weights)
    requests = []
    for i, p in enumerate(prompts):
        req = {"id": f"eval-{i}", **p.request()}
        if "system" not in req and cfg.rollout.system_prompt:
            req["system"] = cfg.rollout.system_prompt
        requests.append(req)
    t0 = time.perf_counter()
    ev = Evaluator(cfg, judge_url)
    try:
        roles = [("model", model)] + ([("baseline", baseline)] if baseline else [])
        answers = {}
        for role, path in roles:
            answers[role] = ev.generate(path, requests)
            ev.rate(answers[role])
        report: dict[str, Any] = {
            "prompts": prompt_source, "num_prompts": len(prompts), "judge": judge_label, "aspects": aspects,
            "weights": weights, "max_new_tokens": cfg.eval.max_new_tokens,
        }
        for role, path in roles:
            report[role] = {"path": path, "summary": summarize(answers[role], weights, aspects)}
        if baseline:
            cand, base = answers["model"], answers["baseline"]
            items = both_order_items([(c["prompt"], c["history"], c["segments"], b["segments"])
                                      for c, b in zip(cand, base)])
            outcomes = both_order_outcomes(ev.judge_pairs(items), lambda r: weighted_rating(r, weights, aspects))
            wr = win_rate(outcomes, prefix="eval", seed=cfg.seed)
            report["win_rate"] = {k.split("/", 1)[1]: v for k, v in wr.items()}
            for c, o in zip(cand, outcomes):
                c["outcome"] = o
        report["responses"] = [
            {"id": p.id, "prompt": p.text,
             **{role: {k: answers[role][i].get(k) for k in ("text", "segments", "scores", "num_tokens")}
                for role, _ in roles},
             **({"outcome": answers["model"][i].get("outcome")} if baseline else {})}
            for i, p in enumerate(prompts)
        ]
        report["time_s"] = time.perf_counter() - t0
        return report
    finally:
        ev.shutdown()


def build_parser(prog: str = "twodrl eval") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Judge a policy checkpoint per aspect, and against a "
                                 "baseline checkpoint (win rate, both orders, bootstrap 95% interval).")
    ap.add_argument("--model", required=True, help="model directory, run directory (with --round), or model name")
    ap.add_argument("--round", type=int, default=None, help="round of a run directory --model (default: newest)")
    ap.add_argument("--baseline", default=None, help="the checkpoint to compare against (same forms as --model)")
    ap.add_argument("--baseline-round", type=int, default=None, help="round of a run directory --baseline")
    ap.add_argument("--prompts", default="synthetic",
                    help="a prompt dataset (JSONL, Parquet, datasets directory, hub name) or 'synthetic'")
    ap.add_argument("--split", default="train", help="split of a datasets directory or hub dataset --prompts")
    ap.add_argument("--num-prompts", type=int, default=None, help="the first N prompts (default: eval.num_prompts)")
    judge = ap.add_mutually_exclusive_group()
    judge.add_argument("--judge-url", default=None, help="OpenAI-compatible judge endpoint (default: annotator.base_url)")
    judge.add_argument("--judge-mode", choices=("synthetic", "generic"), default=None,
                       help="start the local rule-based judge in this mode (default when no URL: synthetic for "
                            "--prompts synthetic, else generic)")
    ap.add_argument("--config", default=None, help="run config for aspects, lengths, resources (default: the run "
                    "directory's config.yaml, else built-in defaults)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", dest="json_out", default=None, help="write the full report here")
    ap.add_argument("--md", dest="md_out", default=None, help="write the Markdown table here")
    return ap


def main(argv: list[str] | None = None, prog: str = "twodrl eval") -> int:
    args = build_parser(prog).parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        config = args.config or _run_dir_config(args.model)
        cfg = load_config(config, args.overrides)
        if args.num_prompts is not None and args.num_prompts < 1:
            raise EvalError(f"--num-prompts must be ≥ 1, got {args.num_prompts}")
        model = resolve_checkpoint(args.model, args.round)
        baseline = resolve_checkpoint(args.baseline, args.baseline_round) if args.baseline else None
        if args.baseline is None and args.baseline_round is not None:
            raise EvalError("--baseline-round needs --baseline")
        prompts = load_prompt_set(args.prompts, cfg, args.num_prompts or cfg.eval.num_prompts, args.split)
        prompts, dropped = _fitting_prompts(prompts, cfg, model)
        if not prompts:
            raise EvalError(f"{args.prompts}: no prompt fits policy.max_length − eval.max_new_tokens "
                            f"({cfg.policy.max_length} − {cfg.eval.max_new_tokens})")
    except (ConfigError, EvalError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dropped:
        print(f"[twodrl] eval: {dropped} prompt(s) longer than policy.max_length − eval.max_new_tokens dropped",
              flush=True)
    stop = None
    judge_url = args.judge_url or (None if args.judge_mode else cfg.annotator.base_url)
    if judge_url is None:
        from jobs.driver import _free_port
        from twodrl.annotation.judge_server import start_judge_server

        mode = args.judge_mode or ("synthetic" if args.prompts == "synthetic" else "generic")
        judge_url, stop = start_judge_server(host="127.0.0.1", port=_free_port(), mode=mode)
        judge_label = f"local rule-based judge ({mode})"
    else:
        judge_label = judge_url
    try:
        report = evaluate(cfg, model, baseline, prompts, judge_url, judge_label, args.prompts)
    finally:
        if stop is not None:
            stop()
    report["dropped_too_long"] = dropped
    table = markdown_report(report)
    print(table, end="", flush=True)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=1, default=_json_default))
    if args.md_out:
        Path(args.md_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md_out).write_text(table)
    return 0


def _json_default(x: Any) -> Any:
    return float(x) if isinstance(x, (int, float)) else str(x)


def _fitting_prompts(prompts: list, cfg: RunConfig, model: str) -> tuple[list, int]:
    """Prompts whose rendered length leaves room for ``eval.max_new_tokens`` inside
    ``policy.max_length`` (the rollout worker refuses the others), counted, never cut."""
    from twodrl.models.loading import load_tokenizer, resolve_model_path
    from twodrl.tasks import prompt_token_counter

    tok = load_tokenizer(dataclasses.replace(cfg.policy, path=resolve_model_path(model)))
    count = prompt_token_counter(tok, cfg.rollout.system_prompt)
    limit = cfg.policy.max_length - cfg.eval.max_new_tokens
    kept = [p for p in prompts if count(p) <= limit]
    return kept, len(prompts) - len(kept)


if __name__ == "__main__":
    sys.exit(main())
