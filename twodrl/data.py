"""HelpSteer-2D preference records: the data model, loading, validation and writing.

One record is a prompt (with optional multi-turn history) and two responses. Each
response carries its segments and one rating per segment for every aspect::

    {"prompt": str,
     "history": [{"role": "user" | "assistant" | "system" | "tool", "content": str}, ...],
     "chosen":   {"text": str, "segments": [str, ...],
                  "scores": {"helpfulness": [int per segment], "correctness": [...], ...}},
     "rejected": {same}}

JSONL holds one such object per line; Parquet (or a ``datasets`` dataset) holds the
same columns. Other top-level fields (ids, sources) are kept in
:attr:`PreferenceRecord.extra` and written back unchanged.

Validation errors name the place and the field, e.g.
``data.jsonl:7: chosen.scores.correctness has 3 ratings for 4 segments`` (JSONL: 1-based
line; Parquet and datasets: ``row N``, 0-based like ``dataset[N]``).

:func:`load_seed004_layout` reads the other layout in the literature (the adaptive
message-wise RLHF paper's appendix): a response text plus one list per aspect of
per-sentence ratings, with the sentences implied by segmenting the text.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from twodrl.aspects import ASPECTS, DEFAULT_ASPECTS, HELPSTEER_ASPECTS
from twodrl.segmentation import Span, align_segments, segment_text

ROLES = ("system", "user", "assistant", "tool")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


class DataError(ValueError):
    """A malformed record; the message names the file, line/row and field."""


# --------------------------------------------------------------------------- records


@dataclass
class Response:
    """One response: its text, its segments (stripped display form) and, per aspect,
    one integer rating per segment."""

    text: str
    segments: list[str]
    scores: dict[str, list[int]]

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    def score_matrix(self, aspects: Sequence[str] = DEFAULT_ASPECTS, dtype=torch.float32) -> torch.Tensor:
        """``[S, A]`` ratings in the order of ``aspects``."""
        missing = [a for a in aspects if a not in self.scores]
        if missing:
            raise KeyError(f"response has no ratings for aspect(s) {missing}; it has {sorted(self.scores)}")
        return torch.tensor([self.scores[a] for a in aspects], dtype=dtype).reshape(len(aspects), -1).T

    def spans(self) -> list[Span]:
        """Character spans of :attr:`segments` in :attr:`text` (covering the text), the
        input of :func:`twodrl.segmentation.batch_segment_ids`."""
        return align_segments(self.text, self.segments)

    def to_json(self) -> dict:
        return {"text": self.text, "segments": list(self.segments), "scores": {k: list(v) for k, v in self.scores.items()}}

    @classmethod
    def from_json(cls, obj: dict | str, aspects: Sequence[str] = DEFAULT_ASPECTS, where: str = "<response>") -> "Response":
        if isinstance(obj, str):
            obj = _loads(obj, where)
        return _parse_response(obj, "response", aspects, where)


@dataclass
class PreferenceRecord:
    """A prompt with a chosen and a rejected :class:`Response`."""

    prompt: str
    chosen: Response
    rejected: Response
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # other top-level fields, kept as given

    def score_matrices(self, aspects: Sequence[str] = DEFAULT_ASPECTS, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``([S_chosen, A], [S_rejected, A])`` ratings."""
        return self.chosen.score_matrix(aspects, dtype), self.rejected.score_matrix(aspects, dtype)

    def messages(self) -> list[dict]:
        """The conversation up to the response: history, then the prompt as a user turn."""
        return [dict(m) for m in self.history] + [{"role": "user", "content": self.prompt}]

    def to_json(self) -> dict:
        """A JSON-ready dict in the HelpSteer-2D shape (``json.dumps`` it for a line)."""
        out = dict(self.extra)
        out.update(prompt=self.prompt, chosen=self.chosen.to_json(), rejected=self.rejected.to_json())
        if self.history:
            out["history"] = [dict(m) for m in self.history]
        return out

    @classmethod
    def from_json(
        cls, obj: dict | str, aspects: Sequence[str] = DEFAULT_ASPECTS, where: str = "<record>"
    ) -> "PreferenceRecord":
        """Parse and validate one record (a dict or a JSON string)."""
        if isinstance(obj, str):
            obj = _loads(obj, where)
        return parse_record(obj, aspects, where)


@dataclass
class LoadResult:
    records: list[PreferenceRecord]
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[PreferenceRecord]:
        return iter(self.records)


# --------------------------------------------------------------------------- validation


def _loads(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _expect(value: Any, tp: type | tuple, field_name: str, where: str, what: str) -> Any:
    if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
        raise DataError(f"{where}: {field_name} must be {what}, got {_type(value)}")
    return value


def _maybe_json(value: Any, field_name: str, where: str) -> Any:
    """Columnar stores often keep nested fields as JSON strings; accept those."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: {field_name}: invalid JSON string: {e.msg}") from None
    return value


def _rating(value: Any, field_name: str, k: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: {field_name}[{k}] must be an integer rating, got {_type(value)} {value!r}")
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise DataError(f"{where}: {field_name}[{k}] must be an integer rating, got {value!r}")
        value = int(value)
    return value


def _parse_response(obj: Any, name: str, aspects: Sequence[str], where: str) -> Response:
    obj = _maybe_json(obj, name, where)
    _expect(obj, dict, name, where, "an object with text, segments and scores")
    for key in ("text", "segments", "scores"):
        if obj.get(key) is None:
            raise DataError(f"{where}: {name}.{key} is missing")
    text = _expect(obj["text"], str, f"{name}.text", where, "a string")
    segments = _expect(_maybe_json(obj["segments"], f"{name}.segments", where), list, f"{name}.segments", where, "a list of strings")
    if not segments:
        raise DataError(f"{where}: {name}.segments is empty (a response needs at least one segment)")
    for k, seg in enumerate(segments):
        _expect(seg, str, f"{name}.segments[{k}]", where, "a string")
        if not seg.strip():
            raise DataError(f"{where}: {name}.segments[{k}] is empty")
    try:
        align_segments(text, segments)
    except ValueError as e:
        raise DataError(f"{where}: {name}.segments do not match {name}.text: {e}") from None

    raw_scores = _expect(_maybe_json(obj["scores"], f"{name}.scores", where), dict, f"{name}.scores", where, "an object of aspect -> ratings")
    # Columnar stores give every aspect column of the schema; a null one is absent.
    raw_scores = {a: v for a, v in raw_scores.items() if v is not None}
    scores: dict[str, list[int]] = {}
    for aspect, ratings in raw_scores.items():
        fname = f"{name}.scores.{aspect}"
        if aspect not in ASPECTS:
            close = difflib.get_close_matches(str(aspect), sorted(ASPECTS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"{where}: {fname}: unknown aspect {aspect!r}{hint}; known: {sorted(ASPECTS)}")
        _expect(ratings, list, fname, where, "a list of ratings")
        if len(ratings) != len(segments):
            raise DataError(f"{where}: {fname} has {len(ratings)} ratings for {len(segments)} segments")
        spec = ASPECTS[aspect]
        values = [_rating(v, fname, k, where) for k, v in enumerate(ratings)]
        for k, v in enumerate(values):
            if not spec.valid(v):
                allowed = f"{{{spec.low}, {spec.high}}} (pass/fail)" if spec.binary else f"{spec.low}..{spec.high}"
                raise DataError(f"{where}: {fname}[{k}] = {v} is outside the scale {allowed}")
        scores[aspect] = values
    missing = [a for a in aspects if a not in scores]
    if missing:
        raise DataError(f"{where}: {name}.scores is missing aspect(s) {missing}")
    return Response(text=text, segments=[str(s).strip() for s in segments], scores=scores)


def _parse_history(value: Any, where: str) -> list[dict]:
    value = _maybe_json(value, "history", where)
    if value is None:
        return []
    _expect(value, list, "history", where, "a list of {role, content} turns")
    turns = []
    for i, turn in enumerate(value):
        _expect(turn, dict, f"history[{i}]", where, "an object with role and content")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: history[{i}].role must be one of {list(ROLES)}, got {role!r}")
        _expect(content, str, f"history[{i}].content", where, "a string")
        turns.append({"role": role, "content": content})
    return turns


def _check_aspects(aspects: Sequence[str], where: str) -> tuple[str, ...]:
    unknown = [a for a in aspects if a not in ASPECTS]
    if unknown:
        raise DataError(f"{where}: unknown aspect(s) {unknown} requested; known: {sorted(ASPECTS)}")
    return tuple(aspects)


def parse_record(obj: Any, aspects: Sequence[str] = DEFAULT_ASPECTS, where: str = "<record>") -> PreferenceRecord:
    """Validate one HelpSteer-2D object and build its :class:`PreferenceRecord`.
    Raises :class:`DataError` naming ``where`` and the field."""
    _check_aspects(aspects, where)
    _expect(obj, dict, "record", where, "a JSON object")
    for key in ("prompt", "chosen", "rejected"):
        if obj.get(key) is None:
            raise DataError(f"{where}: {key} is missing")
    prompt = _expect(obj["prompt"], str, "prompt", where, "a string")
    if not prompt.strip():
        raise DataError(f"{where}: prompt is empty")
    history = _parse_history(obj.get("history"), where)
    chosen = _parse_response(obj["chosen"], "chosen", aspects, where)
    rejected = _parse_response(obj["rejected"], "rejected", aspects, where)
    # Null extras are dropped: columnar stores fill absent columns with nulls.
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "history", "chosen", "rejected") and v is not None}
    return PreferenceRecord(prompt=prompt, chosen=chosen, rejected=rejected, history=history, extra=extra)


# --------------------------------------------------------------------------- loading


def _rows_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: not valid UTF-8 at byte {e.start}")
                continue
            if not line.strip():
                continue  # blank lines (a trailing newline) are not records
            try:
                yield where, _loads(line, where)
            except DataError as e:
                yield where, e


def _rows_table(rows: Iterable[dict], label: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(rows):
        yield f"{label}:row {i}", row


def _rows_parquet(path: Path) -> tuple[Iterator[tuple[str, Any]], int]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet: {e}") from None
    return _rows_table(table.to_pylist(), str(path)), table.num_rows


def _rows_datasets(source: str, split: str) -> tuple[Iterator[tuple[str, Any]], int]:
    """A directory written by ``Dataset.save_to_disk``, a data directory, or a hub
    dataset name, all through ``datasets``."""
    import datasets

    path = Path(source)
    saved = path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())
    try:
        if saved:
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{source}: no split {split!r}; splits: {sorted(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as e:  # offline hub, missing dataset, bad files: one clear line
        raise DataError(f"{source}: cannot load with datasets ({type(e).__name__}: {e})") from None
    return _rows_table(iter(ds), f"{source}[{split}]"), len(ds)


def _iter_rows(source: str | os.PathLike, split: str) -> tuple[Iterator[tuple[str, Any]], Optional[int]]:
    path = Path(source).expanduser()
    name = path.name.lower()
    if path.is_file():
        if name.endswith(JSONL_SUFFIXES):
            return _rows_jsonl(path), None
        if name.endswith(PARQUET_SUFFIXES):
            return _rows_parquet(path)
        raise DataError(f"{path}: unknown data file type; expected one of {JSONL_SUFFIXES + PARQUET_SUFFIXES}")
    if path.is_dir():
        return _rows_datasets(str(path), split)
    if name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES) or str(source).startswith((".", "/", "~")):
        raise DataError(f"{source}: no such file or directory")
    return _rows_datasets(str(source), split)  # a hub dataset name such as "org/name"


def _collect(
    rows: Iterator[tuple[str, Any]],
    total: Optional[int],
    parse,
    strict: bool,
    progress: bool,
    desc: str,
) -> LoadResult:
    result = LoadResult(records=[])
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, total=total, desc=desc, unit="rec")
    for where, obj in rows:
        try:
            if isinstance(obj, DataError):
                raise obj
            result.records.append(parse(obj, where))
        except DataError as e:
            if strict:
                raise
            result.skipped += 1
            result.errors.append(str(e))
    return result


def load_records(
    source: str | os.PathLike,
    aspects: Sequence[str] = DEFAULT_ASPECTS,
    strict: bool = True,
    split: str = "train",
    progress: bool = False,
) -> LoadResult:
    """Load HelpSteer-2D records from JSONL, Parquet, a saved ``datasets`` directory or a
    hub dataset name (``split`` picks the split for the last two).

    ``aspects`` must be rated in every response (extra known aspects are kept).
    ``strict``: the first bad record raises :class:`DataError`; otherwise bad records
    are skipped, counted in ``skipped`` and described in ``errors``.
    """
    aspects = _check_aspects(aspects, str(source))
    rows, total = _iter_rows(source, split)
    return _collect(rows, total, lambda obj, where: parse_record(obj, aspects, where), strict, progress, f"load {source}")


# --------------------------------------------------------------------------- seed-004 layout


def response_from_aspect_lists(
    text: str,
    ratings: Sequence[Sequence[Any]],
    aspects: Sequence[str] = HELPSTEER_ASPECTS,
    name: str = "response",
    where: str = "<response>",
) -> Response:
    """A :class:`Response` from a text and one list of per-sentence ratings per aspect
    (``ratings[j][k]``: aspect ``j``, sentence ``k``); sentences come from
    :func:`twodrl.segmentation.segment_text`, so their count must match every list."""
    _expect(text, str, f"{name}.text", where, "a string")
    _expect(ratings, list, f"{name}_scores", where, f"a list of {len(aspects)} per-aspect lists")
    if len(ratings) != len(aspects):
        raise DataError(
            f"{where}: {name}_scores has {len(ratings)} per-aspect lists for {len(aspects)} aspects {list(aspects)}"
        )
    segments = [s.strip() for s in segment_text(text)]
    scores = {}
    for aspect, row in zip(aspects, ratings):
        scores[aspect] = row
    obj = {"text": text, "segments": segments, "scores": scores}
    return _parse_response(obj, name, aspects, where)


def _parse_seed004(obj: Any, aspects: Sequence[str], where: str) -> PreferenceRecord:
    _expect(obj, dict, "record", where, "a JSON object")
    prompt = obj.get("instruction", obj.get("prompt"))
    if prompt is None:
        raise DataError(f"{where}: instruction is missing")
    _expect(prompt, str, "instruction", where, "a string")
    for key in ("chosen", "rejected", "chosen_scores", "rejected_scores"):
        if obj.get(key) is None:
            raise DataError(f"{where}: {key} is missing")
    chosen = response_from_aspect_lists(obj["chosen"], obj["chosen_scores"], aspects, "chosen", where)
    rejected = response_from_aspect_lists(obj["rejected"], obj["rejected_scores"], aspects, "rejected", where)
    known = ("instruction", "prompt", "history", "chosen", "rejected", "chosen_scores", "rejected_scores")
    extra = {k: v for k, v in obj.items() if k not in known}
    return PreferenceRecord(prompt, chosen, rejected, _parse_history(obj.get("history"), where), extra)


def load_seed004_layout(
    source: str | os.PathLike,
    aspects: Sequence[str] = HELPSTEER_ASPECTS,
    strict: bool = True,
    progress: bool = False,
) -> LoadResult:
    """Load records in the layout of the adaptive message-wise RLHF paper's appendix.

    One JSON object per line with ``instruction`` (or ``prompt``), ``chosen`` and
    ``rejected`` texts, and ``chosen_scores`` / ``rejected_scores``: one list per
    aspect (default order: helpfulness, correctness, coherence, complexity, verbosity)
    of per-sentence ratings. Optional ``history``. Lists whose length differs from the
    number of sentences are errors (the paper's own example has such rows; non-strict
    mode skips them).
    """
    aspects = _check_aspects(aspects, str(source))
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{source}: no such file")
    return _collect(_rows_jsonl(path), None, lambda o, w: _parse_seed004(o, aspects, w), strict, progress, f"load {source}")


# --------------------------------------------------------------------------- writing


def _record_json(record: PreferenceRecord | dict) -> dict:
    return record.to_json() if isinstance(record, PreferenceRecord) else dict(record)


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename: readers never
    see half a file and a crash leaves the old one intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_jsonl(records: Iterable[PreferenceRecord | dict], path: str | os.PathLike) -> int:
    """Write records as JSONL atomically; returns the number written."""
    lines = [json.dumps(_record_json(r), ensure_ascii=False) + "\n" for r in records]
    _atomic_write(Path(path), lambda f: f.write("".join(lines).encode("utf-8")))
    return len(lines)


def write_parquet(records: Iterable[PreferenceRecord | dict], path: str | os.PathLike) -> int:
    """Write records as Parquet (nested columns) atomically; returns the number written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_record_json(r) for r in records]
    for row in rows:
        row.setdefault("history", [])
    table = pa.Table.from_pylist(rows)
    _atomic_write(Path(path), lambda f: pq.write_table(table, f))
    return len(rows)


def records_from_dicts(
    rows: Iterable[dict], aspects: Sequence[str] = DEFAULT_ASPECTS, label: str = "<records>"
) -> list[PreferenceRecord]:
    """Validate in-memory dicts (e.g. :func:`twodrl.synthetic.make_preference_records`)."""
    return [parse_record(r, aspects, f"{label}[{i}]") for i, r in enumerate(rows)]


SAMPLE_PATH = Path(__file__).parent / "data" / "helpsteer2d_sample.jsonl"
SEED004_EXAMPLE_PATH = Path(__file__).parent / "data" / "seed004_layout_example.jsonl"

__all__ = [
    "DataError",
    "LoadResult",
    "PreferenceRecord",
    "Response",
    "SAMPLE_PATH",
    "SEED004_EXAMPLE_PATH",
    "load_records",
    "load_seed004_layout",
    "parse_record",
    "records_from_dicts",
    "response_from_aspect_lists",
    "write_jsonl",
    "write_parquet",
]
