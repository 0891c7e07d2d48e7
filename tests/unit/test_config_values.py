"""Config values, not just types (twodrl.config): every numeric field's declared range,
the cross-field value checks, and loading that turns hostile or broken input (not
UTF-8, deep nesting, alias bombs, bad ``--set`` values) into one-line ConfigErrors."""

from __future__ import annotations

import dataclasses
import json
import textwrap
import types
import typing
from pathlib import Path

import pytest

from twodrl.config import ConfigError, Range, RunConfig, check_ranges, load_config, validate_run_config


def _yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def _error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(*args, **kwargs)
    return str(err.value)


# ------------------------------------------------------------------ the schema itself


def _unwrap(tp):
    """(the scalar type inside Optional[...] / list[...], whether it is a list)."""
    is_list = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tp
    if typing.get_origin(tp) is list:
        is_list, tp = True, (typing.get_args(tp) or (typing.Any,))[0]
    return tp, is_list


def _sections(cls=RunConfig, prefix=""):
    """Every (dotted name, dataclass field, scalar type) reachable from RunConfig."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        tp, _ = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(tp):
            yield from _sections(tp, dotted)
        else:
            yield dotted, f, tp


NUMERIC = [(d, f, tp) for d, f, tp in _sections() if tp in (int, float)]
FLOATS = [d for d, f, tp in NUMERIC if tp is float]


def test_the_schema_walk_sees_every_section():
    names = {d for d, _, _ in NUMERIC}
    # Nested and Optional sections are walked too (reference is Optional[ModelConfig]).
    assert {"policy.max_length", "reference.max_length", "scorer.model.max_length", "learner.lr",
            "dpa.angle_low", "eval.max_new_tokens", "aspects.weights", "logging.metrics_port"} <= names


@pytest.mark.parametrize("dotted", [d for d, _, _ in NUMERIC])
def test_every_numeric_field_declares_a_range(dotted):
    # A field added without `ranged(...)` fails here, not in a run that got a bad value.
    field = {d: f for d, f, _ in NUMERIC}[dotted]
    rng = field.metadata.get("range")
    assert isinstance(rng, Range), f"{dotted} has no declared range: define it with ranged(default, low, high)"


def test_only_numeric_fields_declare_ranges():
    for dotted, f, tp in _sections():
        if "range" in f.metadata:
            assert tp in (int, float), f"{dotted}: a range on a {tp} field"


def test_defaults_are_in_range():
    check_ranges(RunConfig())
    load_config()  # and pass every cross-field check


# ------------------------------------------------------------------ bad values


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("learner:\n  lr: .nan\n", ":2: learner.lr must be a finite number in (0, 1], got nan"),
        ("learner:\n  lr: .inf\n", ":2: learner.lr must be a finite number in (0, 1], got inf"),
        ("learner:\n  lr: 0\n", ":2: learner.lr must be in (0, 1], got 0.0"),
        ("learner:\n  lr: 1.5\n", ":2: learner.lr must be in (0, 1], got 1.5"),
        ("seed: 1\nrollout:\n  temperature: -3\n", ":3: rollout.temperature must be in [0, 10], got -3.0"),
        ("learner:\n  epochs_per_round: -1\n", ":2: learner.epochs_per_round must be ≥ 1, got -1"),
        ("learner:\n  grad_accum_steps: 0\n", ":2: learner.grad_accum_steps must be ≥ 1, got 0"),
        ("rollout:\n  prompts_per_round: 1e9\n", ":2: rollout.prompts_per_round: expected int, got str '1e9'"),
        ("rollout:\n  prompts_per_round: 1.0e+9\n",
         ":2: rollout.prompts_per_round: expected int, got float 1000000000.0"),
        ("rollout:\n  prompts_per_round: 1000000000\n",
         ":2: rollout.prompts_per_round must be in [1, 1000000], got 1000000000"),
        ("rollout:\n  top_p: 0\n", ":2: rollout.top_p must be in (0, 1], got 0.0"),
        ("annotator:\n  concurrency: 0\n", ":2: annotator.concurrency must be ≥ 1, got 0"),
        ("annotator:\n  timeout_s: -1\n", ":2: annotator.timeout_s must be > 0, got -1.0"),
        ("annotator:\n  fraction: 1.01\n", ":2: annotator.fraction must be in [0, 1], got 1.01"),
        ("annotator:\n  max_cost_usd: -.inf\n", ":2: annotator.max_cost_usd must be a finite number ≥ 0, got -inf"),
        ("learner:\n  beta: 0\n", ":2: learner.beta must be > 0, got 0.0"),
        ("learner:\n  label_smoothing: 0.5\n", ":2: learner.label_smoothing must be in [0, 0.5), got 0.5"),
        ("logging:\n  keep_checkpoints: 0\n", ":2: logging.keep_checkpoints must be ≥ 1, got 0"),
        ("logging:\n  metrics_port: 70000\n", ":2: logging.metrics_port must be in [1, 65535], got 70000"),
        ("task:\n  sft_examples: -1\n", ":2: task.sft_examples must be ≥ 0, got -1"),
        ("task:\n  train_prompts: 0\n", ":2: task.train_prompts must be ≥ 1, got 0"),
        ("scorer:\n  max_restarts: -1\n", ":2: scorer.max_restarts must be ≥ 0, got -1"),
        ("scorer:\n  model:\n    max_length: 0\n", ":3: scorer.model.max_length must be ≥ 1, got 0"),
        ("reference:\n  max_length: -5\n", ":2: reference.max_length must be ≥ 1, got -5"),
        ("rollout:\n  num_gpus: -0.5\n", ":2: rollout.num_gpus must be ≥ 0, got -0.5"),
        ("ray:\n  num_cpus: 0\n", ":2: ray.num_cpus must be ≥ 1, got 0"),
        ("dpa:\n  angle_low: -4\n", ":2: dpa.angle_low must be in [-3.14159, 3.14159], got -4.0"),
        ("dpa:\n  replay_fraction: 1\n", ":2: dpa.replay_fraction must be in [0, 1), got 1.0"),
        ("eval:\n  num_prompts: 0\n", ":2: eval.num_prompts must be ≥ 1, got 0"),
        ("seed: -1\n", ":1: seed must be in [0, 4294967295], got -1"),
        ("aspects:\n  names: [helpfulness, correctness]\n  weights: [.nan, 1]\n",
         ":3: aspects.weights[0] must be a finite number in [0, 1], got nan"),
        # Cross-field checks name the line of the field they blame.
        ("policy:\n  max_length: 512\nrollout:\n  max_new_tokens: 512\n",
         ":4: rollout.max_new_tokens must be < policy.max_length (512), got 512"),
        ("eval:\n  max_new_tokens: 4096\n", ":2: eval.max_new_tokens must be < policy.max_length (512), got 4096"),
        ("dpa:\n  angle_low: 0.5\n  angle_high: 0.1\n", ":2: dpa.angle_low must be < dpa.angle_high, got 0.5 ≥ 0.1"),
        ("run_name: ../../x\n", ":1: run_name must be 1-128 characters of letters, digits"),
        ("algorithm: dpa-rsf\ndpa:\n  objectives: [helpfulness, kindness]\n",
         ":3: dpa.objectives: unknown objective(s) ['kindness']; valid: ['clarity', 'completeness', 'correctness', "
         "'helpfulness', 'safety', 'verbosity']"),
    ],
)
def test_bad_values_name_line_and_field(tmp_path, yaml_text, message):
    path = _yaml(tmp_path, yaml_text)
    assert _error(path).startswith(f"{path}{message}")


@pytest.mark.parametrize(
    "name", ["../../x", "a/b", "/abs", ".hidden", "..", "a b", "x\x00", "é", "x" * 129, "a\\b", "a\nb"]
)
def test_unsafe_run_names(tmp_path, name):
    # JSON strings are YAML double-quoted scalars: any character can be written.
    path = _yaml(tmp_path, f"seed: 1\nrun_name: {json.dumps(name)}\n")
    _one_line(_error(path), f"{path}:2: run_name must be 1-128 characters")


@pytest.mark.parametrize("name", ["my-run", "run_1.2", "A", "-x", "x" * 128, ""])
def test_safe_run_names(name):
    assert load_config(overrides=[f"run_name={name}"]).run_name == name


def test_dpa_objectives():
    dpa = ["algorithm=dpa-rsf", "aspects.names=[helpfulness, verbosity]", "aspects.weights=[0.5, 0.5]"]
    assert load_config(overrides=[*dpa, "dpa.objectives=[verbosity, helpfulness]"]).dpa.objectives[0] == "verbosity"
    # Scored aspects of this run only: correctness is an aspect, but not one this run scores.
    err = _error(overrides=[*dpa, "dpa.objectives=[helpfulness, correctness]"])
    assert err.startswith("--set: dpa.objectives: unknown objective(s) ['correctness']")
    assert "must be ≥ 2 distinct names" in _error(overrides=[*dpa, "dpa.objectives=[helpfulness]"])
    assert "must be ≥ 2 distinct names" in _error(overrides=[*dpa, "dpa.objectives=[helpfulness, helpfulness]"])
    # Other algorithms never read the objectives: an aspect the run does not score is
    # fine there, a name that is no aspect at all is still a typo.
    assert load_config(overrides=["aspects.names=[correctness]", "aspects.weights=[1]"]).algorithm == "2d-dpo"
    assert "unknown objective(s) ['helpfulnes']" in _error(overrides=["dpa.objectives=[helpfulnes, verbosity]"])


def test_set_overrides_name_the_flag():
    assert _error(overrides=["learner.lr=.nan"]) == "--set: learner.lr must be a finite number in (0, 1], got nan"
    assert _error(overrides=["annotator.timeout_s=-1"]) == "--set: annotator.timeout_s must be > 0, got -1.0"
    # A whole section given with --set: its fields are blamed on the flag too.
    assert _error(overrides=["learner={lr: 2}"]) == "--set: learner.lr must be in (0, 1], got 2.0"


def test_a_default_value_has_no_line(tmp_path):
    # The file shrinks policy.max_length under the rollout's default max_new_tokens
    # (96): the default has no line, so the error points at the line that was written.
    path = _yaml(tmp_path, "seed: 1\npolicy:\n  max_length: 64\n")
    assert _error(path) == f"{path}:3: rollout.max_new_tokens must be < policy.max_length (64), got 96"
    cfg = RunConfig()
    cfg.learner.lr = float("nan")  # a config built in code is checked the same way
    with pytest.raises(ConfigError, match=r"^here: learner.lr must be a finite number in \(0, 1\], got nan$"):
        validate_run_config(cfg, "here")


@pytest.mark.parametrize("dotted", FLOATS)
def test_nan_and_inf_refused_for_every_float(dotted):
    fields = {d: f for d, f, _ in NUMERIC}
    is_list = dotted == "aspects.weights"  # the one list of floats
    for bad in (".nan", ".inf", "-.inf"):
        value = f"[{bad}, 0]" if is_list else bad
        err = _error(overrides=[f"{dotted}={value}"])
        allow_inf = fields[dotted].metadata["range"].allow_inf
        if bad == ".nan" or not allow_inf:
            assert err.startswith(f"--set: {dotted}") and "must be a finite number" in err, err


def test_edges_and_none_are_accepted():
    cfg = load_config(overrides=[
        "learner.lr=1", "rollout.temperature=0", "rollout.top_p=1", "annotator.fraction=0",
        "dpa.angle_low=-3.141592653589793", "dpa.angle_high=3.141592653589793", "logging.metrics_port=65535",
        "task.sft_examples=0", "rollout.max_restarts=0", "rollout.prompts_per_round=1000000",
        "annotator.max_requests=null", "logging.metrics_port=1", "ray.num_cpus=null", "learner.max_grad_norm=0",
    ])
    assert cfg.learner.lr == 1.0 and cfg.logging.metrics_port == 1 and cfg.ray.num_cpus is None


def test_reference_trust_remote_code_warns():
    with pytest.warns(UserWarning, match="reference.trust_remote_code is on"):
        load_config(overrides=["reference.path=tiny:ref", "reference.trust_remote_code=true"])


# ------------------------------------------------------------------ robust loading


def _one_line(err: str, starts: str) -> None:
    assert err.startswith(starts), err
    assert "\n" not in err and len(err) < 300, err


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"rounds: 2\nrun_name: caf\xe9\n")
    _one_line(_error(path), f"{path}:2: not UTF-8 text (byte 0xe9 at offset 23)")
    path.write_text("rounds: 2\n", encoding="utf-16")
    _one_line(_error(path), f"{path}:1: not UTF-8 text")
    path.write_bytes(b"rounds: 2\nseed: 1\x07\n")  # valid UTF-8, but YAML refuses control characters
    _one_line(_error(path), f"{path}:2: invalid YAML: control character #x0007 is not allowed")


@pytest.mark.parametrize(
    "text",
    [
        "rounds: " + "[" * 10_000 + "]" * 10_000 + "\n",
        "rounds: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n",
        "rounds:\n" + "".join("  " * i + "-\n" for i in range(1, 200)),
    ],
    ids=["flow-lists", "flow-mappings", "block-lists"],
)
def test_deep_nesting(tmp_path, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    err = _error(path)
    _one_line(err, f"{path}:")
    assert "nested more than 32 levels deep" in err


def test_alias_bomb_and_self_reference(tmp_path):
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 9):  # 9**9 strings once expanded
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    _one_line(_error(path), f"{path}: expands to more than 100000 values (aliases included)")
    # Within a known key, too (the bomb is never walked value by value, nor printed).
    path.write_text("\n".join(lines[:-1]) + "\naspects:\n  names: &i [" + ", ".join(["*h"] * 9) + "]\n")
    _one_line(_error(path), f"{path}: expands to more than 100000 values")
    path.write_text("aspects:\n  names: &x [*x]\n")
    _one_line(_error(path), f"{path}:")
    path.write_text("? [a, b]\n: 1\n")
    _one_line(_error(path), f"{path}:1: a key must be a plain name, got a list")


def test_aliases_in_a_normal_config_still_work(tmp_path):
    path = _yaml(tmp_path, "rollout:\n  max_new_tokens: &n 64\neval:\n  max_new_tokens: *n\n")
    cfg = load_config(path)
    assert cfg.rollout.max_new_tokens == cfg.eval.max_new_tokens == 64


@pytest.mark.parametrize(
    "override, message",
    [
        ("learner.lr=[", "--set 'learner.lr=[': invalid YAML value: expected the node content"),
        ("learner.lr={", "--set 'learner.lr={': invalid YAML value"),
        ("learner.lr=*a", "--set 'learner.lr=*a': invalid YAML value: found undefined alias 'a'"),
        ("=3", "--set '=3': expected dotted.key=value, got key ''"),
        ("a..b=1", "--set 'a..b=1': expected dotted.key=value, got key 'a..b'"),
        ("learner=5", "--set: learner: expected a mapping, got int"),
        ("rounds=" + "[" * 10_000, "--set 'rounds=[[[["),
        ("learner.lr=" + "9" * 400, "--set: learner.lr: 9999"),
    ],
)
def test_bad_set_values(override, message):
    err = _error(overrides=[override])
    _one_line(err, message)


def test_online_job_reports_a_bad_config_in_one_line(tmp_path, capsys):
    from jobs import online

    path = tmp_path / "deep.yaml"
    path.write_text("rounds: " + "[" * 10_000 + "]" * 10_000 + "\n")
    assert online.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:1: nested more than") and err.count("\n") == 1
    good = tmp_path / "good.yaml"
    good.write_text("rounds: 2\n")
    assert online.main([str(good), "--set", "learner.lr=["]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set 'learner.lr=[': invalid YAML value") and err.count("\n") == 1
