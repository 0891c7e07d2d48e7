"""EngineGate: engine work and weight updates never overlap, an update waits for the
work already running, work asked for mid-update waits for the finish, and each piece of
work sees the version it ran with."""

from __future__ import annotations

import threading
import time

import pytest

from actors.rollout import EngineGate, PartialWeightsError


def _in_thread(fn):
    out: dict = {}

    def run():
        out["value"] = fn()
        out["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_work_reads_the_version_it_runs_with():
    gate = EngineGate()
    with gate.use() as v:
        assert v == 0
    gate.begin_update()
    assert gate.end_update(7) == 7
    with gate.use() as v:
        assert v == 7


def test_update_waits_for_running_work_and_blocks_new_work():
    gate = EngineGate(version=1)
    release = threading.Event()
    log: list[str] = []

    def work():
        with gate.use() as v:
            log.append("work-start")
            release.wait(5)
            log.append("work-end")
            return v

    worker, got = _in_thread(work)
    while "work-start" not in log:
        time.sleep(0.01)
    updater, opened = _in_thread(lambda: (gate.begin_update(), log.append("update-open"))[0])
    time.sleep(0.1)
    assert "update-open" not in log  # still waiting for the running work
    assert gate.updating  # ...but the gate is already shut to new work
    late, late_got = _in_thread(lambda: _use_version(gate, log))
    time.sleep(0.1)
    assert "late-work" not in log
    release.set()
    worker.join(5)
    updater.join(5)
    assert opened["value"] is True and log[:3] == ["work-start", "work-end", "update-open"]
    time.sleep(0.1)
    assert "late-work" not in log  # the update is still open
    gate.end_update(2)
    late.join(5)
    assert got["value"] == 1 and late_got["value"] == 2
    assert log[-1] == "late-work"


def _use_version(gate: EngineGate, log: list) -> int:
    with gate.use() as v:
        log.append("late-work")
        return v


def test_second_begin_of_one_update_does_not_reopen():
    gate = EngineGate()
    assert gate.begin_update() is True
    assert gate.begin_update() is False
    gate.end_update(None)
    assert not gate.updating and gate.version == 0


def test_partial_update_refuses_work_until_a_complete_one():
    gate = EngineGate(version=3)
    gate.begin_update()
    gate.end_update(None, partial="half loaded")
    with pytest.raises(PartialWeightsError, match="half loaded"):
        with gate.use():
            pass
    assert gate.version == 3
    gate.begin_update()
    gate.end_update(4)
    with gate.use() as v:
        assert v == 4
