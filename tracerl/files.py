"""Reading and writing user files so that a bad file is a one-line error and a failed write
leaves nothing behind.

Reading: text files must be UTF-8; bad bytes are an error naming the file, the line and the byte
offset (not a ``UnicodeDecodeError`` traceback).  Writing: outputs go to a temporary file in the
destination's folder, renamed over the destination once complete (``os.replace``), so a reader
sees the old file or the whole new one; a failed write (a directory in the way, a read-only
folder, a full disk) removes the temporary file and raises ``OutputError`` naming the path.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from tracerl.errors import OutputError, TracerlError


def utf8_problem(data: bytes, where: str, line: int | None = None, offset: int = 0) -> str | None:
    """Why ``data`` is not UTF-8 (``where:line: ...``, with the byte's offset in the file), or
    None.  ``line``/``offset``: where ``data`` starts in its file (default: ``data`` is the whole
    file, and the line is counted)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line if line is not None else data.count(b"\n", 0, e.start) + 1
        return (f"{where}:{at}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {offset + e.start}); "
                "save the file as UTF-8")
    return None


def read_utf8(path: str | os.PathLike, error: type[TracerlError]) -> str:
    """The text of a UTF-8 file; bad bytes raise ``error`` naming the file, line and offset."""
    data = Path(path).read_bytes()
    problem = utf8_problem(data, str(path))
    if problem:
        raise error(problem)
    return data.decode("utf-8")


def _cannot_write(path: Path, e: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write ({e.strerror or e}); nothing was written")


class AtomicFile:
    """A text file written next to ``path`` and renamed into place by ``commit``.

    Created at once, so a destination that cannot be written fails before any work is spent on
    its content.  As a context manager: committed on success, removed on any exception."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise OutputError(f"{self.path}: is a directory; give a file name")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
            # 0o666 less the umask, as open() would give the file itself (mkstemp's is 0o600).
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as e:
            raise _cannot_write(self.path, e) from None
        self._file = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, text: str) -> None:
        try:
            self._file.write(text)
        except OSError as e:
            self.abort()
            raise _cannot_write(self.path, e) from None

    def commit(self) -> Path:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())  # the data is on disk before the name points to it
            self._file.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise _cannot_write(self.path, e) from None
        return self.path

    def abort(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # a full disk can fail the final flush too; the file goes anyway
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see ``AtomicFile``)."""
    with AtomicFile(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")
