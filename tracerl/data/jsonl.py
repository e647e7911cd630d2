"""JSONL reading with row-level validation: errors name the file, the line and the field."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tracerl.errors import TracerlError
from tracerl.files import AtomicFile, utf8_problem


class DataError(TracerlError):
    """A data row that cannot be used: names file, line and field."""


class BadLine(DataError):
    """A line that is not a JSON value (bad bytes, invalid JSON); ``text``: the line as read,
    undecodable bytes replaced, so a report can show it."""

    def __init__(self, message: str, text: str) -> None:
        super().__init__(message)
        self.text = text


@dataclass
class Rows:
    rows: list[tuple[int, dict]]  # (1-based line number, row)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object",
               bool: "true/false"}


def check_field(row: dict, name: str, types: type | tuple[type, ...], where: str) -> Any:
    if name not in row:
        raise DataError(f"{where}: missing field {name!r}")
    value = row[name]
    types = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise DataError(f"{where}: field {name!r} must be {wanted}, got {type(value).__name__} {value!r:.60}")
    return value


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` per non-blank line; a line that is not UTF-8 JSON comes as a
    ``BadLine`` in place of the value (the caller decides: stop, or skip and report)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    offset = 0  # of the line in the file, for the byte offset of bad bytes
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            problem = utf8_problem(raw, str(path), line_no, start)
            if problem:
                yield line_no, BadLine(problem, text)
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, BadLine(f"{path}:{line_no}: invalid JSON: {e.msg} (column {e.colno})", text)


def read_jsonl(path: str | Path, validate=None, *, skip_bad_rows: bool = False) -> Rows:
    """Read a JSONL file; ``validate(row, where)`` raises DataError for a bad row.

    Without ``skip_bad_rows`` the first bad row stops everything (nothing is silently shifted);
    with it, bad rows are skipped and reported with their line and reason.
    """
    out = Rows([])
    for line_no, row in iter_jsonl(path):
        where = f"{path}:{line_no}"
        try:
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if validate is not None:
                validate(row, where)
        except DataError as e:
            if not skip_bad_rows:
                raise
            out.skipped.append((line_no, str(e)))
            continue
        out.rows.append((line_no, row))
    return out


def write_rows(out: AtomicFile, rows) -> None:
    """Write one JSON object per line into an open ``AtomicFile`` (its owner commits it)."""
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows) -> Path:
    """One JSON object per line, written atomically (tracerl/files.py)."""
    with AtomicFile(path) as out:
        write_rows(out, rows)
    return out.path
