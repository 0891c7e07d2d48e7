"""The config system (twodrl.config): YAML loading, errors with file:line and field,
cross-field checks, ``--set`` overrides, and the validate job on configs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from jobs import validate
from twodrl.config import ConfigError, RunConfig, dump_config, load_config, to_dict

REPO = Path(__file__).resolve().parents[2]


def _yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def _error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(*args, **kwargs)
    return str(err.value)


def test_defaults_and_a_valid_file(tmp_path):
    assert load_config() == RunConfig()
    path = _yaml(
        tmp_path,
        """
        seed: 3
        algorithm: appo
        learner:
          lr: 1          # an int is a valid float
          zero_stage: 3
        aspects:
          names: [helpfulness, verbosity]
          weights: [0.5, 0.5]
        reference:
          path: tiny:ref
        """,
    )
    cfg = load_config(path)
    assert cfg.seed == 3 and cfg.algorithm == "appo"
    assert cfg.learner.lr == 1.0 and isinstance(cfg.learner.lr, float)
    assert cfg.learner.zero_stage == 3 and cfg.learner.beta == RunConfig().learner.beta
    assert cfg.reference.path == "tiny:ref" and cfg.reference.dtype == "float32"
    assert cfg.aspects.names == ["helpfulness", "verbosity"]


def test_unknown_key_has_line_and_suggestion(tmp_path):
    path = _yaml(tmp_path, "rounds: 2\nlearner:\n  lr: 0.1\n  betta: 0.3\n")
    assert _error(path) == f"{path}:4: unknown key 'learner.betta' (did you mean 'beta'?)"
    path = _yaml(tmp_path, "rounds: 2\nlearnr:\n  lr: 0.1\n", "top.yaml")
    assert _error(path) == f"{path}:2: unknown key 'learnr' (did you mean 'learner'?)"
    path = _yaml(tmp_path, "scorer:\n  model:\n    pth: x\n", "nested.yaml")
    assert _error(path) == f"{path}:3: unknown key 'scorer.model.pth' (did you mean 'path'?)"
    path = _yaml(tmp_path, "zzzz: 1\n", "far.yaml")
    assert _error(path) == f"{path}:1: unknown key 'zzzz'"


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("rounds: three\n", ":1: rounds: expected int, got str 'three'"),
        ("rounds: 2.5\n", ":1: rounds: expected int, got float 2.5"),
        ("rounds: true\n", ":1: rounds: expected int, got bool True"),
        ("seed: 1\nlearner:\n  lr: fast\n", ":3: learner.lr: expected float, got str 'fast'"),
        ("logging:\n  wandb: 1\n", ":2: logging.wandb: expected bool, got int 1"),
        ("algorithm: 3d-dpo\n", ":1: algorithm: '3d-dpo' is not one of"),
        ("learner:\n  zero_stage: true\n", ":2: learner.zero_stage: True is not one of [0, 1, 2, 3]"),
        ("learner:\n  zero_stage: 2.0\n", ":2: learner.zero_stage: 2.0 is not one of [0, 1, 2, 3]"),
        ("aspects:\n  names: helpfulness\n", ":2: aspects.names: expected a list, got str 'helpfulness'"),
        ("aspects:\n  weights: [0.5, high]\n", ":2: aspects.weights[1]: expected float, got str 'high'"),
        ("learner: 5\n", ":1: learner: expected a mapping, got int"),
        ("annotator:\n  max_requests: lots\n", ":2: annotator.max_requests: expected int, got str 'lots'"),
    ],
)
def test_wrong_types_name_line_and_field(tmp_path, yaml_text, message):
    path = _yaml(tmp_path, yaml_text)
    assert _error(path).startswith(f"{path}{message}")


def test_yaml_11_exponent_floats_are_floats(tmp_path):
    # PyYAML reads `1e-6` (no dot) as a string; config files write it all the time.
    cfg = load_config(_yaml(tmp_path, "learner:\n  lr: 1e-6\n  beta: 2E-1\n"))
    assert cfg.learner.lr == 1e-6 and cfg.learner.beta == 0.2
    assert load_config(overrides=["learner.lr=5e-7"]).learner.lr == 5e-7


@pytest.mark.parametrize(
    "aspects_yaml, message",
    [
        ("names: [helpfulness, correctness]\n  weights: [1.0]",
         "aspects.weights has 1 values for 2 aspects.names ['helpfulness', 'correctness']"),
        ("names: [helpfulness, correctness]\n  weights: [0.5, 0.6]", "aspects.weights must sum to 1, got 1.1"),
        ("names: [helpfulness, correctness]\n  weights: [1.5, -0.5]", "aspects.weights[0] must be in [0, 1], got 1.5"),
        ("names: [helpfulness, helpfulness]\n  weights: [0.5, 0.5]", "aspects.names has duplicates"),
        ("names: [helpfulness, kindness]\n  weights: [0.5, 0.5]", "aspects.names: unknown aspect(s) ['kindness']"),
    ],
)
def test_aspect_cross_checks(tmp_path, aspects_yaml, message):
    path = _yaml(tmp_path, f"aspects:\n  {aspects_yaml}\n")
    err = _error(path)
    assert err.startswith(f"{path}:") and message in err  # a range error also names the line


def test_other_cross_field_checks():
    assert "rollout.samples_per_prompt must be ≥ 2" in _error(overrides=["rollout.samples_per_prompt=1"])
    assert load_config(overrides=["rollout.samples_per_prompt=1", "algorithm=dpa-rsf"]).rollout.samples_per_prompt == 1
    assert "rollout.top_p must be in (0, 1]" in _error(overrides=["rollout.top_p=0"])
    assert "learner.beta must be > 0" in _error(overrides=["learner.beta=0"])
    assert "rounds must be ≥ 1" in _error(overrides=["rounds=0"])
    with pytest.warns(UserWarning, match="policy.trust_remote_code is on"):
        load_config(overrides=["policy.trust_remote_code=true"])


def test_set_overrides_scalars_lists_and_nested(tmp_path):
    path = _yaml(tmp_path, "rounds: 2\nlearner:\n  lr: 0.1\n")
    cfg = load_config(
        path,
        [
            "rounds=7",
            "learner.lr=0.02",
            "aspects.names=[helpfulness, correctness]",
            "aspects.weights=[0.25, 0.75]",
            "scorer.model.path=tiny:other",  # two levels down, absent from the file
            "reference.path=tiny:ref",  # an Optional section created from nothing
            "annotator.base_url=http://127.0.0.1:8000/v1",  # ':' inside the value
            "run_name=",  # empty string
            "task.dataset=null",
        ],
    )
    assert cfg.rounds == 7 and cfg.learner.lr == 0.02
    assert cfg.aspects.names == ["helpfulness", "correctness"] and cfg.aspects.weights == [0.25, 0.75]
    assert cfg.scorer.model.path == "tiny:other" and cfg.scorer.model.dtype == "float32"
    assert cfg.reference.path == "tiny:ref"
    assert cfg.annotator.base_url == "http://127.0.0.1:8000/v1"
    assert cfg.run_name == "" and cfg.task.dataset is None


def test_set_override_errors_point_at_the_override(tmp_path):
    path = _yaml(tmp_path, "learner:\n  lr: 0.1\n")
    assert _error(path, ["learner.lr=abc"]) == "--set: learner.lr: expected float, got str 'abc'"
    assert _error(path, ["learner.lrr=0.1"]) == "--set: unknown key 'learner.lrr' (did you mean 'lr'?)"
    assert _error(path, ["rounds"]) == "--set 'rounds': expected dotted.key=value"
    assert _error(path, ["learner.lr.x=3"]) == "--set 'learner.lr.x=3': 'lr' is not a section"
    # A list override that breaks the aspect/weight pairing is caught by the cross-checks.
    assert "aspects.weights has 5 values for 1 aspects.names" in _error(path, ["aspects.names=[helpfulness]"])


def test_invalid_yaml_names_the_line(tmp_path):
    path = _yaml(tmp_path, "rounds: 2\nlearner:\n  lr: [1, 2\n  beta: 3\n")
    err = _error(path)
    assert err.startswith(f"{path}:4: invalid YAML")
    path = _yaml(tmp_path, "rounds: 2\nseed: 1\nfoo: bar: baz\n", "colon.yaml")
    assert _error(path).startswith(f"{path}:3: invalid YAML: mapping values are not allowed here")
    path = _yaml(tmp_path, "rounds: 2\nseed: 1\nrounds: 3\n", "dup.yaml")
    assert _error(path) == f"{path}:3: duplicate key 'rounds'"
    path = _yaml(tmp_path, "- rounds\n- seed\n", "list.yaml")
    assert _error(path) == f"{path}: the top level must be a mapping of sections"
    assert _error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: config file not found"
    assert load_config(_yaml(tmp_path, "# only a comment\n", "empty.yaml")) == RunConfig()


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config(overrides=["algorithm=simpo", "aspects.names=[helpfulness]", "aspects.weights=[1]", "reference.path=tiny:r"])
    dump_config(cfg, tmp_path / "dumped.yaml")
    again = load_config(tmp_path / "dumped.yaml")
    assert again == cfg and to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def test_validate_job_on_configs(tmp_path, capsys):
    good = _yaml(tmp_path, "rounds: 2\n")
    assert validate.main([str(good)]) == 0
    assert capsys.readouterr().out.startswith(f"OK: {good}: algorithm 2d-dpo, 2 rounds")
    assert validate.main([str(good), "--set", "learner.lr=x"]) == 1
    assert capsys.readouterr().err.strip() == "error: --set: learner.lr: expected float, got str 'x'"
    bad = _yaml(tmp_path, "learner:\n  betta: 1\n", "bad.yaml")
    assert validate.main([str(bad)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {bad}:2: unknown key 'learner.betta' (did you mean 'beta'?)"
    # A config that names a prompt dataset gets it read row by row (HelpSteer-2D pair
    # records are prompt rows too: their prompt and history).
    from twodrl.data import SAMPLE_PATH

    with_data = _yaml(tmp_path, f"task:\n  name: dataset\n  dataset: {SAMPLE_PATH}\n", "data.yaml")
    assert validate.main([str(with_data)]) == 0
    assert f"OK: task.dataset {SAMPLE_PATH}[train]" in capsys.readouterr().out
    ignored = _yaml(tmp_path, f"task:\n  dataset: {SAMPLE_PATH}\n", "ignored.yaml")
    assert validate.main([str(ignored)]) == 1
    assert "task.name=dataset" in capsys.readouterr().err
    hub = _yaml(tmp_path, "task:\n  name: dataset\n  dataset: someorg/some-prompts\n", "hub.yaml")
    assert validate.main([str(hub)]) == 0
    assert "NOT CHECKED: task.dataset someorg/some-prompts" in capsys.readouterr().out
    missing = _yaml(tmp_path, "task:\n  name: dataset\n  dataset: /nonexistent/train.jsonl\n", "remote.yaml")
    assert validate.main([str(missing)]) == 1
    capsys.readouterr()
    assert validate.main([str(missing), "--skip-dataset"]) == 0
