"""The English prompt set shipped as package data: enough records, unique ids and
texts, and every record in one of the two layouts (a bare prompt, or a chat whose
last turn is the user's)."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest

MAX_CHARS = 350


@pytest.fixture(scope="module")
def records():
    # Read through importlib.resources, as an installed package would be.
    path = resources.files("twodrl") / "data" / "prompts_en.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def canonical(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def request_text(record: dict) -> str:
    """What the user is asking now: the prompt, or the last (user) turn of a chat."""
    return record["prompt"] if "prompt" in record else record["messages"][-1]["content"]


def test_enough_records_with_unique_ids(records):
    assert len(records) >= 190
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"en-\d{4}", i) for i in ids)


def test_each_record_has_exactly_one_layout(records):
    for r in records:
        assert ("prompt" in r) != ("messages" in r), r["id"]
        assert set(r) <= {"id", "prompt", "messages"}, r["id"]
        if "prompt" in r:
            assert isinstance(r["prompt"], str) and r["prompt"].strip(), r["id"]
            assert len(r["prompt"]) < MAX_CHARS, r["id"]


def test_chats_end_with_a_user_turn(records):
    chats = [r for r in records if "messages" in r]
    assert len(chats) >= 10
    for r in chats:
        turns = r["messages"]
        assert len(turns) >= 2 and turns[-1]["role"] == "user", r["id"]
        roles = [t["role"] for t in turns]
        assert set(roles) <= {"system", "user", "assistant"}, r["id"]
        assert "system" not in roles[1:], r["id"]  # a system turn, if any, comes first
        assert all(isinstance(t["content"], str) and t["content"].strip() for t in turns), r["id"]


def test_no_duplicate_requests(records):
    texts = [canonical(request_text(r)) for r in records]
    duplicates = sorted({t for t in texts if texts.count(t) > 1})
    assert not duplicates


def test_lengths_vary(records):
    words = [len(r["prompt"].split()) for r in records if "prompt" in r]
    assert min(words) <= 5 and max(words) >= 40
