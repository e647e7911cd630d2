"""tracerl/files.py: UTF-8 errors that name the line and byte; atomic outputs that leave nothing
behind when a write fails (a real full tmpfs, tests/support/disks.py)."""

from __future__ import annotations

import os

import pytest

from tests.support.disks import mounted_tmpfs
from tracerl.errors import ConfigError, OutputError
from tracerl.files import AtomicFile, read_utf8, utf8_problem, write_json, write_text


def test_utf8_problem_names_the_line_and_the_byte_offset(tmp_path):
    data = "ligne 1\nl\u00e9gal\n".encode() + b"caf\xe9\n"
    assert utf8_problem(data, "f.txt") == ("f.txt:3: not UTF-8 text (byte 0xe9 at offset 18); "
                                           "save the file as UTF-8")
    assert utf8_problem(b"ab\xff", "f.jsonl", line=7, offset=100).startswith("f.jsonl:7: not UTF-8 text (byte 0xff "
                                                                             "at offset 102)")
    assert utf8_problem("\u00e9t\u00e9".encode(), "f") is None
    path = tmp_path / "x.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=r"x\.yaml:3: not UTF-8"):
        read_utf8(path, ConfigError)


def test_atomic_file_replaces_only_when_complete(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it
    with pytest.raises(RuntimeError):
        with AtomicFile(target) as f:
            f.write("half")
            raise RuntimeError("the work failed")
    assert target.read_text() == '{\n  "a": 1\n}\n' and sorted(os.listdir(tmp_path)) == ["out.json"]


def test_atomic_file_refuses_a_directory_before_any_work(tmp_path):
    with pytest.raises(OutputError, match=r"is a directory; give a file name"):
        AtomicFile(tmp_path)


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", size="16k") as disk:
        target = disk / "scores.jsonl"
        write_text(target, "old\n")
        with pytest.raises(OutputError) as err:
            write_text(target, "x" * 64_000)
        assert str(err.value) == f"{target}: cannot write (No space left on device); nothing was written"
        assert target.read_text() == "old\n" and os.listdir(disk) == ["scores.jsonl"]
