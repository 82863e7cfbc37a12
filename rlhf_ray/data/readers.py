"""Read record files (.jsonl, .parquet, .txt) into validated records, or fail naming every problem.

Each problem reads `{path}:{line}: {field}: {message} (got {value!r})`, with `field` written as in
Python (`messages[2].role`). For parquet files the number is the 1-based row. A whole file (or a
list of files) is checked before anything is returned, so training never starts on half the data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from rlhf_ray.data.records import Record, TextRecord

R = TypeVar("R", bound=Record)

SUFFIXES = (".jsonl", ".parquet", ".txt")
MAX_SHOWN = 20  # problems listed in a RecordError's message; the rest are counted
MAX_VALUE_CHARS = 80


class RecordError(ValueError):
    """Bad record files. `problems` holds every problem; the message lists the first MAX_SHOWN."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:MAX_SHOWN]
        if len(problems) > MAX_SHOWN:
            shown.append(f"... and {len(problems) - MAX_SHOWN} more")
        super().__init__("\n".join(shown))


def read_records(path: Path | str, kind: type[R]) -> list[R]:
    """All records of one file, validated as `kind`; RecordError lists every problem."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        supported = ", ".join(SUFFIXES)
        raise RecordError([f"{path}: unsupported file type {path.suffix!r}; supported: {supported}"])
    if path.suffix == ".txt" and kind is not TextRecord:
        needs = f"{kind.__name__} needs .jsonl or .parquet"
        raise RecordError([f"{path}: .txt files hold plain-text documents; {needs}"])
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecordError([f"{path}: file not found"]) from None
    except OSError as e:
        raise RecordError([f"{path}: cannot read: {e.strerror}"]) from None

    problems: list[str] = []
    rows = _rows(path, data, problems) if data else []
    if not rows and not problems:
        raise RecordError([f"{path}: no records (the file is empty)"])
    records: list[R] = []
    for number, row in rows:
        try:
            record = kind.model_validate(row)
            record._where = f"{path}:{number}"
            records.append(record)
        except ValidationError as e:
            problems += _describe(e, f"{path}:{number}")
    if problems:
        raise RecordError(problems)
    return records


def read_many(paths: list[Path], kind: type[R]) -> list[R]:
    """The records of all files in order; problems across files are gathered into one RecordError."""
    records: list[R] = []
    problems: list[str] = []
    for path in paths:
        try:
            records += read_records(path, kind)
        except RecordError as e:
            problems += e.problems
    if problems:
        raise RecordError(problems)
    return records


def _rows(path: Path, data: bytes, problems: list[str]) -> list[tuple[int, Any]]:
    """(line or row number, raw record) pairs; file-format problems are appended to `problems`."""
    if path.suffix == ".txt":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(_not_utf8(path, data, e.start))
            return []
        return [(1, {"text": text})]
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as e:
            problems.append(f"{path}: not a readable parquet file: {e}")
            return []
        # A parquet row has every column of the file; a null there means the field is absent.
        rows = table.to_pylist()
        return [(n, {k: v for k, v in row.items() if v is not None}) for n, row in enumerate(rows, 1)]
    return _jsonl_rows(path, data, problems)


def _jsonl_rows(path: Path, data: bytes, problems: list[str]) -> list[tuple[int, Any]]:
    rows = []
    offset = 0
    for number, raw in enumerate(data.split(b"\n"), 1):
        line_start, offset = offset, offset + len(raw) + 1
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # -sig: tolerate a leading BOM
        except UnicodeDecodeError as e:
            problems.append(_not_utf8(path, data, line_start + e.start))
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problem = f"not valid JSON at column {e.colno}: {e.msg}"
            problems.append(f"{path}:{number}: {problem} (got {_short(line)})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path}:{number}: expected a JSON object per line (got {_short(row)})")
            continue
        rows.append((number, row))
    return rows


def _not_utf8(path: Path, data: bytes, offset: int) -> str:
    line = data.count(b"\n", 0, offset) + 1
    return f"{path}:{line}: not valid UTF-8: byte {data[offset]:#04x} at offset {offset} of the file"


def _describe(error: ValidationError, where: str) -> list[str]:
    problems = []
    for err in error.errors(include_url=False):
        # Record-level checks (loc == ()) name the field at the start of their own message.
        field = _field_name(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see the README, 'Record formats')"
        got = "" if err["type"] == "missing" or not err["loc"] else f" (got {_short(err['input'])})"
        problems.append(f"{where}: {field + ': ' if field else ''}{message}{got}")
    return problems


def _field_name(loc: tuple[int | str, ...]) -> str:
    """('messages', 2, 'role') -> 'messages[2].role'."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else part
    return name


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."
