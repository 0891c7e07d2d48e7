"""``twodrl annotate``: build a HelpSteer-2D dataset by asking an LLM judge to rate every
segment of every response on every aspect.

    twodrl annotate --input pairs.jsonl --output helpsteer2d.jsonl \\
        [--base-url URL] [--model M] [--concurrency C] [--timeout S] [--max-retries N] \\
        [--max-repairs N] \\
        [--budget-requests N] [--budget-tokens N] [--budget-usd X] [--cache PATH] \\
        [--config FILE] [--set annotator.x=y ...]

The key comes from ``$OPENAI_API_KEY`` (or the variable ``annotator.api_key_env``
names). Without ``--base-url`` (and no ``annotator.base_url``) the local rule-based
judge is started in-process, which needs no key.

Input layouts: see :mod:`twodrl.annotation.records`. Output: one HelpSteer-2D record
per annotated input line (with its 0-based ``index``); failures go to
``OUTPUT.failures.jsonl`` as ``{"index": i, "line": i+1, "reason": ...}``.

Resuming: a rerun skips every index already in OUTPUT and retries the rest, including
earlier failures; answers already paid for come from the cache (default
``OUTPUT.cache.sqlite``), so they are never bought twice. Every record is appended,
flushed and fsynced on its own, so a kill -9 leaves at worst a truncated last line,
which the next run cuts off.

Budget: the caps (``--budget-*``) are for the whole job across its resumes: the cache
records what every request cost, and a rerun starts from that spend (``--no-cache``:
the caps count this invocation only).

Exit status: 0 when every input was handled (annotated or recorded as a failure), 2 on
a usage/config error, 3 when the run stopped early (budget exhausted, bad key).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import IO, Iterator, Optional

from tqdm import tqdm

from twodrl.config import ConfigError, load_config


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Annotate preference pairs segment × aspect with an LLM judge.")
    p.add_argument("--input", required=True, help="JSONL of pairs (see twodrl/annotation/records.py for layouts)")
    p.add_argument("--output", required=True, help="HelpSteer-2D JSONL to write (appended; resumable)")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint; default: start the local rule-based judge")
    p.add_argument("--model", help="judge model name (annotator.model)")
    p.add_argument("--concurrency", type=int, help="requests in flight (annotator.concurrency)")
    p.add_argument("--timeout", type=float, help="seconds per request (annotator.timeout_s)")
    p.add_argument("--max-retries", type=int, help="retries per request on 429/5xx/timeouts (annotator.max_retries)")
    p.add_argument("--max-repairs", type=int,
                   help="re-asks after a malformed reply before the pair fails (annotator.max_repairs)")
    p.add_argument("--budget-requests", type=int, help="stop after this many requests (annotator.max_requests)")
    p.add_argument("--budget-tokens", type=int, help="stop before this many tokens (annotator.max_tokens)")
    p.add_argument("--budget-usd", type=float, help="stop before this cost (annotator.max_cost_usd)")
    p.add_argument("--cache", help="SQLite answer cache (default OUTPUT.cache.sqlite)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the answer cache")
    p.add_argument("--single", action="store_true", help="one response per request instead of pairwise")
    p.add_argument("--config", help="YAML config (annotator.* and aspects.* sections are used)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def failures_path(output: str | os.PathLike) -> Path:
    return Path(str(output) + ".failures.jsonl")


def _append(fh: IO[str], obj: dict) -> None:
    # One line, flushed and fsynced before the next: a kill -9 can only ever cut the
    # line being written, never an earlier one.
    fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def done_indices(output: Path) -> set[int]:
    """Indices already in ``output``; a truncated last line (kill -9 mid-write) is cut
    off so that appending continues on a clean line."""
    done: set[int] = set()
    if not output.exists():
        return done
    good_end = 0
    with open(output, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                break  # unfinished write
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                # Our writes end with the newline, so a complete line that is not JSON
                # was not made by an interrupted run: refuse rather than guess.
                raise ValueError(f"{output}:{lineno}: not a JSON record; fix or move the file") from None
            if isinstance(rec, dict) and isinstance(rec.get("index"), int):
                done.add(rec["index"])
            good_end += len(raw)
    if good_end != output.stat().st_size:
        with open(output, "r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
        print(f"{output}: cut off a truncated last line (interrupted write)", file=sys.stderr)
    return done


def _inputs(path: Path, skip: set[int]) -> Iterator[tuple[int, Optional[dict], Optional[str]]]:
    """(index, object, error) for every non-blank line not in ``skip``."""
    with open(path, encoding="utf-8") as fh:
        for index, line in enumerate(fh):
            if index in skip or not line.strip():
                continue
            try:
                yield index, json.loads(line), None
            except json.JSONDecodeError as e:
                yield index, None, f"{path}:{index + 1}: invalid JSON: {e.msg} (column {e.colno})"


def _count_todo(path: Path, skip: set[int]) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for i, line in enumerate(fh) if line.strip() and i not in skip)


def main(argv: list[str], prog: str = "twodrl annotate") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    ann = cfg.annotator
    for flag, field_name in (("base_url", "base_url"), ("model", "model"), ("concurrency", "concurrency"),
                             ("timeout", "timeout_s"), ("max_retries", "max_retries"), ("max_repairs", "max_repairs"),
                             ("budget_requests", "max_requests"), ("budget_tokens", "max_tokens"),
                             ("budget_usd", "max_cost_usd")):
        value = getattr(args, flag)
        if value is not None:
            setattr(ann, field_name, value)
    if args.single:
        ann.pairwise = False
    src, out = Path(args.input), Path(args.output)
    if not src.is_file():
        print(f"{prog}: --input {src}: file not found", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_run(cfg, src, out, args, prog))


async def _run(cfg, src: Path, out: Path, args, prog: str) -> int:
    from twodrl.annotation.cache import JudgeCache
    from twodrl.annotation.client import ChatClient, resolve_api_key
    from twodrl.annotation.pool import AnnotationPool, ItemResult, JudgeItem
    from twodrl.annotation.prompts import TemplateError
    from twodrl.annotation.records import parse_input, to_record

    ann = cfg.annotator
    aspects, weights = cfg.aspects.names, cfg.aspects.weights
    stop_server = None
    base_url = ann.base_url
    if base_url is None:
        from twodrl.annotation.judge_server import start_judge_server

        base_url, stop_server = start_judge_server(model=ann.model)
        print(f"{prog}: no --base-url: using the local rule-based judge at {base_url}", file=sys.stderr)
    elif resolve_api_key(ann.api_key_env) is None:
        print(f"{prog}: set ${ann.api_key_env} to the judge's API key (annotator.api_key_env)", file=sys.stderr)
        return 2

    try:
        done = done_indices(out)
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        if stop_server:
            stop_server()
        return 2
    fail_path = failures_path(out)
    # Earlier failures are retried: start the failures file afresh (atomically), every
    # index not in OUTPUT is attempted again and re-recorded if it fails again.
    tmp = fail_path.with_name(fail_path.name + ".tmp")
    tmp.write_text("")
    os.replace(tmp, fail_path)
    todo = _count_todo(src, done)

    cache = None if args.no_cache else JudgeCache(args.cache or ann.cache_path or str(out) + ".cache.sqlite")
    try:
        client = ChatClient.from_config(ann, base_url=base_url)
        pool = AnnotationPool(client, cache, aspects=aspects, pairwise=ann.pairwise, max_repairs=ann.max_repairs)
    except (ValueError, TemplateError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        if stop_server:
            stop_server()
        return 2

    pairs: dict[int, object] = {}
    counts = {"ok": 0, "failed": 0}
    bar = tqdm(total=todo, desc="annotate", unit="pair", disable=args.no_progress, dynamic_ncols=True)
    out_fh = open(out, "a", encoding="utf-8")
    fail_fh = open(fail_path, "a", encoding="utf-8")

    def fail(index: int, reason: str) -> None:
        _append(fail_fh, {"index": index, "line": index + 1, "reason": reason})
        counts["failed"] += 1
        bar.update(1)
        bar.set_postfix(ok=counts["ok"], failed=counts["failed"], refresh=False)

    def items() -> Iterator[JudgeItem]:
        for index, obj, error in _inputs(src, done):
            if error is None:
                try:
                    pair = parse_input(obj)
                except ValueError as e:
                    error = f"{src}:{index + 1}: {e}"
            if error is not None:
                fail(index, error)  # a bad line never stops the job
                continue
            pairs[index] = pair
            yield JudgeItem(prompt=pair.prompt, responses=pair.segments, history=pair.history, key=index)

    def on_result(r: ItemResult) -> None:
        pair = pairs.pop(r.key)
        if r.ok:
            try:
                record = to_record(pair, r.scores, r.key, aspects, weights)
            except ValueError as e:
                fail(r.key, str(e))
                return
            _append(out_fh, record)
            counts["ok"] += 1
            bar.update(1)
            bar.set_postfix(ok=counts["ok"], failed=counts["failed"], refresh=False)
        else:
            fail(r.key, r.error)

    try:
        await pool.annotate(items(), on_result=on_result)
    finally:
        s = pool.stats()  # while the cache (the run's spend) is still open
        bar.close()
        out_fh.close()
        fail_fh.close()
        await client.aclose()
        if cache is not None:
            cache.close()
        if stop_server:
            stop_server()
    print(
        f"{prog}: {counts['ok']} annotated, {counts['failed']} failed ({fail_path}); "
        f"{s['requests']} requests, {s['cache_hits']} cache hits, {s['repairs']} repairs, "
        f"{s['tokens']} tokens, ${s['cost_usd']:.4f}; skipped {len(done)} already done",
        file=sys.stderr,
    )
    if "run_requests" in s:
        print(f"{prog}: judge spend of this output so far (all runs): {s['run_requests']} requests, "
              f"{s['run_tokens']} tokens, ${s['run_cost_usd']:.4f}", file=sys.stderr)
    if pool.stop_reason:
        print(f"{prog}: stopped early: {pool.stop_reason}; rerun to continue", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
