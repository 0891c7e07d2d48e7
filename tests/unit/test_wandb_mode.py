"""wandb's mode is decided from the environment alone (no network, no login)."""

from twodrl.tracking import wandb_mode


def test_offline_without_a_key():
    assert wandb_mode({}) == "offline"
    assert wandb_mode({"WANDB_API_KEY": ""}) == "offline"


def test_online_with_a_key():
    assert wandb_mode({"WANDB_API_KEY": "not-a-real-key"}) == "online"


def test_explicit_mode_wins():
    assert wandb_mode({"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}) == "offline"
    assert wandb_mode({"WANDB_MODE": "disabled"}) == "disabled"
    assert wandb_mode({"WANDB_MODE": "online"}) == "online"


def test_reads_the_process_environment(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_mode() == "online"
