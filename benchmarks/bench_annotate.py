"""Annotation throughput: requests/s of the judge pool at concurrency 1 vs 16.

    python -m benchmarks.bench_annotate [--json PATH] [--latency-s 0.2] [--seconds 2]

The local judge server answers every request after a fixed latency (default 200 ms,
like a remote API), so throughput is bounded by how many requests the pool keeps in
flight, not by the server. The whole client path is measured: AnnotationPool →
ChatClient (semaphore, rate limiter, budget bookkeeping) → AsyncOpenAI → HTTP → parse.
No cache, so every request goes to the server. Target: rps_c16 ≥ 10 × rps_c1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from pathlib import Path


def _items(n_items: int, offset: int):
    from twodrl.annotation.pool import JudgeItem
    from twodrl.synthetic import make_preference_records

    recs = make_preference_records(n_items, seed=offset)
    # A distinct prompt suffix per item: no two requests are alike (no accidental reuse).
    return [
        JudgeItem(f"{r['prompt']} (#{offset}-{i})", [r["chosen"]["segments"], r["rejected"]["segments"]], key=i)
        for i, r in enumerate(recs)
    ]


async def _measure(url: str, concurrency: int, n_items: int, offset: int) -> dict:
    from twodrl.annotation.client import ChatClient
    from twodrl.annotation.pool import AnnotationPool

    client = ChatClient(base_url=url, api_key=None, model="twodrl-synthetic-judge", concurrency=concurrency,
                        timeout_s=30.0, max_retries=0)
    pool = AnnotationPool(client, cache=None)
    items = _items(n_items, offset)
    # Warm-up (connection set-up, lazy imports) outside the timed region.
    await pool.annotate(_items(1, offset + 1000))
    before = client.stats.requests
    t0 = time.perf_counter()
    results = await pool.annotate(items, window=max(4, concurrency))
    elapsed = time.perf_counter() - t0
    await client.aclose()
    n = client.stats.requests - before
    failures = sum(not r.ok for r in results)
    return {"requests": n, "seconds": elapsed, "rps": n / elapsed, "failures": failures}


def _serve(latency_s: float, queue) -> None:
    from twodrl.annotation.judge_server import Faults, JudgeServer

    server = JudgeServer(faults=Faults(latency_s=latency_s))
    queue.put(server.url)
    server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_annotate", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--latency-s", type=float, default=0.2, help="fixed server latency per request")
    p.add_argument("--seconds", type=float, default=2.0, help="approximate duration of each measurement")
    args = p.parse_args(argv)
    import twodrl.annotation.judge_server  # noqa: F401  (imported once, before the fork)

    import multiprocessing as mp

    # The server runs in its own process, as a remote judge would: in-process, its
    # handler threads would compete with the client for the GIL and the client's
    # overhead would be overstated. fork: the child reuses the imported modules.
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(args.latency_s, queue), daemon=True)
    proc.start()
    url = queue.get(timeout=60)
    try:
        per_item = 5  # requests per pair: one per aspect
        ideal = 1.0 / args.latency_s
        c1_items = max(1, round(args.seconds * ideal / per_item))
        c16_items = max(4, round(args.seconds * ideal * 16 / per_item))
        c1 = asyncio.run(_measure(url, 1, c1_items, 0))
        c16 = asyncio.run(_measure(url, 16, c16_items, 100))
        with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as r:
            max_inflight = json.load(r)["max_inflight"]
    finally:
        proc.terminate()
        proc.join(10)
    out = {
        "rps_c1": round(c1["rps"], 3),
        "rps_c16": round(c16["rps"], 3),
        "speedup": round(c16["rps"] / c1["rps"], 2),
        "latency_s": args.latency_s,
        "requests_c1": c1["requests"],
        "requests_c16": c16["requests"],
        "server_max_inflight": max_inflight,
        "failures": c1["failures"] + c16["failures"],
    }
    print(f"concurrency  1: {c1['requests']:4d} requests in {c1['seconds']:.2f} s = {c1['rps']:.2f} req/s")
    print(f"concurrency 16: {c16['requests']:4d} requests in {c16['seconds']:.2f} s = {c16['rps']:.2f} req/s")
    print(f"speedup {out['speedup']}x (target ≥ 10x); server saw at most {max_inflight} requests in flight")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
