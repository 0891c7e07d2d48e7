"""No config field that does nothing: every field of the run config's dataclasses is
read somewhere in the code that runs (``twodrl/``, ``jobs/``, ``actors/``).

The check is by name: the field must appear as an attribute read (``.name``) or a
string key (``"name"``) outside the config module itself. A field no code names cannot
have an effect; one that is named is at least wired (its effect is the other tests').
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from twodrl.config import RunConfig

REPO = Path(__file__).resolve().parents[2]


def _sections(cls: type, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        yield dotted, f.name
        tp = hints[f.name]
        for arg in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(arg):
                yield from _sections(arg, dotted + ".")


def _source() -> str:
    parts = []
    for folder in ("twodrl", "jobs", "actors"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == REPO / "twodrl" / "config.py":
                continue
            parts.append(path.read_text())
    return "\n".join(parts)


def test_every_config_field_is_read():
    src = _source()
    unread = [dotted for dotted, name in _sections(RunConfig)
              if not re.search(rf"\.{name}\b|[\"']{name}[\"']", src)]
    assert not unread, f"config fields that no code reads (make them work or remove them): {unread}"
