"""SQLite answer cache: keyed by model/template/aspect/messages, WAL, durable per answer,
safe with several writer processes."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

from twodrl.annotation.cache import JudgeCache, cache_key

MSGS = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]


def test_key_depends_on_every_part():
    base = cache_key("m", "v1-abc", "safety", MSGS)
    assert base == cache_key("m", "v1-abc", "safety", [dict(m) for m in MSGS])
    assert len({base, cache_key("m2", "v1-abc", "safety", MSGS), cache_key("m", "v1-abd", "safety", MSGS),
                cache_key("m", "v1-abc", "clarity", MSGS),
                cache_key("m", "v1-abc", "safety", MSGS + [{"role": "user", "content": "x"}])}) == 5


def test_put_get_persist_and_wal(tmp_path):
    path = tmp_path / "c.sqlite"
    c = JudgeCache(path)
    k = cache_key("m", "t", "safety", MSGS)
    assert c.get(k) is None
    c.put(k, model="m", template_id="t", aspect="safety", messages=MSGS, reply="R", prompt_tokens=3, completion_tokens=4)
    c.put(k, model="m", template_id="t", aspect="safety", messages=MSGS, reply="other")  # first wins
    assert (c.hits, c.misses) == (0, 1)
    c.close()
    # No close-time flush is needed: a fresh connection (as after kill -9) sees it.
    c2 = JudgeCache(path)
    hit = c2.get(k)
    assert (hit.reply, hit.prompt_tokens, hit.completion_tokens) == ("R", 3, 4)
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert len(c2) == 1 and len(c2.messages_digests()) == 1


def _writer(path, worker, n):
    c = JudgeCache(path)
    for i in range(n):
        msgs = [{"role": "user", "content": f"{worker}-{i}"}]
        c.put(cache_key("m", "t", "clarity", msgs), model="m", template_id="t", aspect="clarity", messages=msgs, reply=str(i))
        # Everyone also writes the same shared keys: races must be harmless.
        shared = [{"role": "user", "content": f"shared-{i}"}]
        c.put(cache_key("m", "t", "clarity", shared), model="m", template_id="t", aspect="clarity", messages=shared, reply="s")
    c.close()


def test_concurrent_writer_processes(tmp_path):
    path = str(tmp_path / "c.sqlite")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 40)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(JudgeCache(path)) == 3 * 40 + 40
