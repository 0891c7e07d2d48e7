"""Crash leftovers, atomic writes and checkpoint manifests (twodrl.checkpoint)."""

from __future__ import annotations

import json
import os

import pytest

from twodrl.checkpoint import (
    MANIFEST_NAME,
    ManifestError,
    atomic_directory,
    atomic_write_text,
    recover_directory,
    recover_run_dir,
    replace_directory,
    round_dir,
    verify_manifest,
    write_driver_state,
)


def make_dir(path, files: dict[str, str]):
    path.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


# ---------------------------------------------------------------------- recovery


def test_interrupted_replace_is_rolled_back(tmp_path):
    # Killed between the two renames: the previous copy aside, the target missing.
    make_dir(tmp_path / ".reward_model.old-4242", {"model.safetensors": "old"})
    make_dir(tmp_path / ".reward_model.tmp-4242", {"model.safetensors": "new?"})
    actions = recover_directory(tmp_path / "reward_model")
    assert (tmp_path / "reward_model" / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward_model"]
    assert any("restored" in a for a in actions)


def test_finished_replace_only_loses_the_old_copy(tmp_path):
    make_dir(tmp_path / "warmstart", {"a": "new"})
    make_dir(tmp_path / ".warmstart.old-7", {"a": "old"})
    make_dir(tmp_path / ".warmstart.tmp.k2j4_x9a", {"a": "half"})  # mkdtemp-style writer
    make_dir(tmp_path / ".warmstart.ab12cd34", {"a": "half"})  # older save_pretrained_safe
    keep = [".previous-20240101T000000Z", ".lock", ".warmstartish", "other"]
    for name in keep:
        (tmp_path / name).mkdir()
    recover_directory(tmp_path / "warmstart")
    assert (tmp_path / "warmstart" / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["warmstart"])
    assert recover_directory(tmp_path / "warmstart") == []  # nothing left to do


def test_recover_run_dir_sweeps_everything_a_crash_leaves(tmp_path):
    run = tmp_path
    ckpts = run / "checkpoints"
    make_dir(ckpts / "round-0001", {"driver.json": "{}"})
    make_dir(ckpts / ".round-0002.old-11", {"driver.json": '{"round": 2}'})  # swap interrupted
    make_dir(ckpts / ".round-0003.tmp-11", {"driver.json": "{}"})  # killed mid-write
    make_dir(run / ".reward_model.tmp-11", {})
    make_dir(run / "..reward_model.tmp-11.tmp.abcd1234", {"x": "nested writer"})
    make_dir(run / ".warmstart.tmp.q1w2e3r4", {"x": "learner writer"})
    make_dir(run / "samples", {"round-0001.jsonl": "ok", ".round-0002.jsonl.tmp-11": "part"})
    make_dir(run / "rounds", {"round-0001.prompts.json": "{}", "round-0002.prompts.tmp": "part"})
    actions = recover_run_dir(run)
    assert len(actions) == 7
    assert sorted(p.name for p in ckpts.iterdir()) == ["round-0001", "round-0002"]
    assert json.loads((ckpts / "round-0002" / "driver.json").read_text()) == {"round": 2}
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "rounds", "samples"]
    assert [p.name for p in (run / "samples").iterdir()] == ["round-0001.jsonl"]
    assert [p.name for p in (run / "rounds").iterdir()] == ["round-0001.prompts.json"]
    assert recover_run_dir(run) == []
    assert recover_run_dir(tmp_path / "absent") == []


# ---------------------------------------------------------------------- atomic writes


def test_atomic_write_text_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "samples" / "round-0001.jsonl"
    atomic_write_text(path, "one\n")
    atomic_write_text(path, "two\n")
    assert path.read_text() == "two\n"
    with pytest.raises(TypeError):
        atomic_write_text(path, None)  # fails mid-write
    assert path.read_text() == "two\n"
    assert [p.name for p in path.parent.iterdir()] == ["round-0001.jsonl"]


def test_replace_directory_swaps_and_leaves_nothing(tmp_path):
    final = make_dir(tmp_path / "m", {"a": "1"})
    replace_directory(make_dir(tmp_path / ".m.tmp-1", {"b": "2"}), final)
    assert [p.name for p in final.iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_save_pretrained_safe_writes_extra_files(tmp_path):
    from twodrl.models.loading import save_pretrained_safe

    class Model:  # the save_pretrained surface only
        generation_config = None

        def save_pretrained(self, path, safe_serialization=True):
            (path / "model.safetensors").write_text("w")

    out = save_pretrained_safe(Model(), None, tmp_path / "rm", extra_files={"marker.json": "{}"})
    assert sorted(p.name for p in out.iterdir()) == ["marker.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]


# ---------------------------------------------------------------------- manifests


def write_round(run_dir, k: int = 1):
    with atomic_directory(round_dir(run_dir, k)) as tmp:
        make_dir(tmp / "learner", {"deepspeed/latest_round/mp_rank_00_model_states.pt": "pickle", "policy/model.safetensors": "w"})
        write_driver_state(tmp, {"round": k})
    return round_dir(run_dir, k)


def test_round_checkpoint_has_a_manifest_that_verifies(tmp_path):
    path = write_round(tmp_path)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert sorted(manifest["files"]) == [
        "driver.json",
        "learner/deepspeed/latest_round/mp_rank_00_model_states.pt",
        "learner/policy/model.safetensors",
        "torch_rng.safetensors",
    ]
    assert verify_manifest(path) is True


@pytest.mark.parametrize(
    "tamper, expected",
    [
        (lambda p: (p / "learner/deepspeed/latest_round/mp_rank_00_model_states.pt").write_text("evil"),
         "learner/deepspeed/latest_round/mp_rank_00_model_states.pt does not match"),
        (lambda p: os.remove(p / "driver.json"), "driver.json listed in MANIFEST.sha256.json is missing"),
        (lambda p: (p / "learner/extra.pt").write_text("x"), "learner/extra.pt is not in"),
        (lambda p: (p / "learner" / MANIFEST_NAME).write_text("{}"), f"learner/{MANIFEST_NAME} is not in"),
        (lambda p: (p / MANIFEST_NAME).write_text("not json"), "unreadable manifest"),
    ],
)
def test_tampered_checkpoint_names_the_file(tmp_path, tamper, expected):
    path = write_round(tmp_path)
    tamper(path)
    with pytest.raises(ManifestError) as e:
        verify_manifest(path)
    assert expected in str(e.value) and str(path) in str(e.value)


def test_missing_manifest(tmp_path):
    make_dir(tmp_path / "old", {"a": "1"})
    with pytest.raises(ManifestError, match="no MANIFEST.sha256.json"):
        verify_manifest(tmp_path / "old")
    assert verify_manifest(tmp_path / "old", required=False) is False
    with atomic_directory(tmp_path / "plain", manifest=False) as tmp:
        (tmp / "a").write_text("1")
    assert not (tmp_path / "plain" / MANIFEST_NAME).exists()


def test_nested_manifest_is_hashed_once_and_still_verified(tmp_path):
    # A learner checkpoint with its own manifest (replace_directory(manifest=True)),
    # inside a round checkpoint: the round records the learner's manifest only.
    with atomic_directory(round_dir(tmp_path, 2)) as tmp:
        inner_tmp = make_dir(tmp / ".learner.tmp.x", {"deepspeed/s.pt": "pickle", "policy/w.safetensors": "w"})
        replace_directory(inner_tmp, tmp / "learner", manifest=True)
        (tmp / "driver.json").write_text("{}")
    path = round_dir(tmp_path, 2)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["nested"] == ["learner"]
    assert sorted(manifest["files"]) == ["driver.json", f"learner/{MANIFEST_NAME}"]
    verify_manifest(path)
    (path / "learner" / "deepspeed" / "s.pt").write_text("evil")
    with pytest.raises(ManifestError, match="deepspeed/s.pt does not match") as e:
        verify_manifest(path)
    assert str(path / "learner") in str(e.value)
    # The learner verifies its own directory: the round's check can skip its contents,
    # but not a swapped learner manifest.
    assert verify_manifest(path, nested=False) is True
    (path / "learner" / MANIFEST_NAME).write_text("{}")
    with pytest.raises(ManifestError, match=f"learner/{MANIFEST_NAME} does not match"):
        verify_manifest(path, nested=False)
