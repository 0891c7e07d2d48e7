"""SQLite cache of judge answers: a rerun or a resume never pays for an answer twice.

Key: sha256 over (model, template id, aspect, canonical JSON of the messages). Only
answers that parsed are stored (a malformed answer is worth nothing, and storing it
would make every rerun replay the same failure instead of retrying it).

Durability and concurrency: WAL journal, one short transaction (autocommit) per
answer, so a kill -9 loses at most the answer being written and never corrupts the
file; several processes (annotator actors, a job and its rerun) may write at once,
serialised by SQLite's lock with a busy timeout. ``INSERT OR IGNORE`` makes a race
between two writers of the same key harmless (both answers are valid; first wins).

Run-wide spend: the ``spend`` table (one row) holds what the judge has cost the whole
run — requests sent, tokens and USD billed — across every annotator actor sharing the
file, actor restarts and resumes. A request is counted when it is claimed, by one
conditional UPDATE that also checks the caps, so concurrent writers can never claim
past ``max_requests``; tokens and cost are added when the answer is stored, in the same
transaction as the answer, so the file never holds an answer whose cost it forgot.

The API key is never an input here: nothing secret can reach the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence


_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    template TEXT NOT NULL,
    aspect TEXT NOT NULL,
    messages_sha TEXT NOT NULL,
    reply TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created REAL NOT NULL
)
"""

# One row (id = 1): a running total is a single-row read before every request, where a
# log of spends would be a growing SUM.
_SPEND_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    requests INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL
)
"""


def messages_digest(messages: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of the canonical JSON of ``messages`` (sorted keys, no spaces)."""
    canonical = json.dumps(list(messages), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def cache_key(model: str, template_id: str, aspect: str, messages: Sequence[Mapping[str, Any]]) -> str:
    payload = json.dumps(
        [model, template_id, aspect, messages_digest(messages)], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass
class CachedAnswer:
    reply: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class RunSpend:
    """What the judge has cost the run so far (every process sharing the file)."""

    requests: int = 0
    tokens: int = 0
    cost_usd: float = 0.0


class JudgeCache:
    """Thread-safe handle on the cache file (one connection, guarded by a lock; the
    work per call is microseconds, so callers on an event loop call it directly)."""

    def __init__(self, path: str | os.PathLike, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: autocommit, every INSERT is its own durable transaction.
        self._db = sqlite3.connect(
            str(self.path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        self._retry_locked(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
        # NORMAL in WAL mode is crash-safe for the database file (a kill -9 of the
        # process cannot corrupt it; only an OS crash could lose the newest commits).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._retry_locked(lambda: self._db.execute(_SCHEMA))
        self._retry_locked(lambda: self._db.execute(_SPEND_SCHEMA))
        self._retry_locked(lambda: self._db.execute("INSERT OR IGNORE INTO spend VALUES (1, 0, 0, 0.0)"))
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _retry_locked(fn, attempts: int = 50):
        # Switching to WAL needs a brief exclusive lock; several processes opening the
        # same new file at once can see "database is locked" despite the busy timeout.
        for i in range(attempts):
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or i == attempts - 1:
                    raise
                time.sleep(0.05 * (i + 1))

    def get(self, key: str) -> Optional[CachedAnswer]:
        with self._lock:
            row = self._db.execute(
                "SELECT reply, prompt_tokens, completion_tokens FROM answers WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return CachedAnswer(*row)

    def put(
        self,
        key: str,
        *,
        model: str,
        template_id: str,
        aspect: str,
        messages: Sequence[Mapping[str, Any]],
        reply: str,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        spend_tokens: int = 0,
        spend_cost: float = 0.0,
    ) -> None:
        """Store an answer; ``spend_tokens``/``spend_cost`` (what obtaining it cost,
        retries and repairs included) are added to the run's spend in the same
        transaction. The spend is added even when another writer stored the key first:
        both answers were paid for."""
        row = (
            key,
            model,
            template_id,
            aspect,
            messages_digest(messages),
            reply,
            int(prompt_tokens),
            int(completion_tokens),
            time.time(),
        )

        def write() -> None:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
                if spend_tokens or spend_cost:
                    self._db.execute(
                        "UPDATE spend SET tokens = tokens + ?, cost_usd = cost_usd + ? WHERE id = 1",
                        (int(spend_tokens), float(spend_cost)),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

        with self._lock:
            self._retry_locked(write)

    # ------------------------------------------------------------------ run-wide spend

    def spend(self) -> RunSpend:
        with self._lock:
            row = self._db.execute("SELECT requests, tokens, cost_usd FROM spend WHERE id = 1").fetchone()
        return RunSpend(int(row[0]), int(row[1]), float(row[2])) if row else RunSpend()

    def claim_request(
        self,
        max_requests: Optional[int] = None,
        max_tokens: Optional[int] = None,
        max_cost_usd: Optional[float] = None,
        pending_tokens: int = 0,
        pending_cost: float = 0.0,
    ) -> Optional[RunSpend]:
        """Count one more request if the run stays within its caps; ``None`` when
        claimed, else the run's spend (for the caller's message). ``pending_*`` is what
        the caller has in flight or not yet recorded, including the next request's
        estimate. Check and increment are one statement: two processes cannot both
        take the last request."""

        def claim() -> int:
            cur = self._db.execute(
                "UPDATE spend SET requests = requests + 1 WHERE id = 1"
                " AND (?1 IS NULL OR requests < ?1)"
                " AND (?2 IS NULL OR tokens + ?3 <= ?2)"
                " AND (?4 IS NULL OR cost_usd + ?5 <= ?4)",
                (max_requests, max_tokens, int(pending_tokens), max_cost_usd, float(pending_cost)),
            )
            return cur.rowcount

        with self._lock:
            claimed = self._retry_locked(claim)
        return None if claimed == 1 else self.spend()

    def add_spend(self, tokens: int = 0, cost: float = 0.0) -> None:
        """Spend with no answer to store (a malformed reply, a timed-out request)."""
        if not tokens and not cost:
            return
        with self._lock:
            self._retry_locked(
                lambda: self._db.execute(
                    "UPDATE spend SET tokens = tokens + ?, cost_usd = cost_usd + ? WHERE id = 1",
                    (int(tokens), float(cost)),
                )
            )

    def messages_digests(self) -> set[str]:
        """Digests of the messages of every cached answer (audits and tests)."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT messages_sha FROM answers")}

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
