"""Plug-in loading: module names and .py files, imported once; every failure is one ConfigError."""

from __future__ import annotations

import sys

import pytest

from tracerl.errors import ConfigError
from tracerl.plugins import load_plugins


def test_files_and_modules_load_once(tmp_path):
    plugin = tmp_path / "counting_plugin.py"
    plugin.write_text("import builtins\nbuiltins.tracerl_test_loads = getattr(builtins, 'tracerl_test_loads', 0) + 1\n")
    import builtins

    [name] = load_plugins([str(plugin)])
    assert load_plugins([str(plugin)]) == [name] and name in sys.modules
    assert builtins.tracerl_test_loads == 1
    assert load_plugins(["json"]) == ["json"]


@pytest.mark.parametrize("source,words", [
    (None, ["plugins: no such file"]),
    ("raise RuntimeError('boom')\n", ["failed to import", "RuntimeError: boom"]),
    ("def broken(:\n", ["failed to import", "SyntaxError"]),
])
def test_a_bad_file_is_one_config_error(tmp_path, source, words):
    path = tmp_path / "bad_plugin.py"
    if source is not None:
        path.write_text(source)
    with pytest.raises(ConfigError) as e:
        load_plugins([str(path)])
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


def test_a_bad_module_name_is_one_config_error():
    with pytest.raises(ConfigError, match=r"plugins: cannot import 'no_such_tracerl_plugin': ModuleNotFoundError"):
        load_plugins(["no_such_tracerl_plugin"])
