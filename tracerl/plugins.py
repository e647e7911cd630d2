"""User plug-ins: modules imported before a run so that they can register RL algorithms, and
named objects (reward functions) loaded from them, without editing the library.  An entry is a
module name (``my_pkg.my_algo``, importable from the current environment) or a path to a ``.py``
file; an object is ``entry:name``."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path

from tracerl.errors import ConfigError


def load_plugins(entries: Iterable[str], key: str = "plugins") -> list[str]:
    """Import every entry once (a repeated call is a no-op); returns the module names."""
    names = []
    for entry in entries:
        if entry.endswith(".py"):
            path = Path(entry).resolve()
            if not path.is_file():
                raise ConfigError(f"{key}: no such file {entry}")
            name = "tracerl_plugin_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
            if name not in sys.modules:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except Exception as e:
                    del sys.modules[name]
                    raise ConfigError(f"{key}: {entry} failed to import: {type(e).__name__}: {e}") from None
        else:
            name = entry
            try:
                importlib.import_module(entry)
            except Exception as e:  # not found, or the module itself failed
                raise ConfigError(f"{key}: cannot import {entry!r}: {type(e).__name__}: {e}") from None
        names.append(name)
    return names


def load_object(spec: str, key: str):
    """The object ``name`` of ``path/to/file.py:name`` or ``module:name`` (the module imported as by
    ``load_plugins``); a missing file, module or name is a ConfigError naming ``key``."""
    entry, sep, name = spec.rpartition(":")
    if not sep or not entry or not name.isidentifier():
        raise ConfigError(f"{key}: {spec!r} is not 'path/to/file.py:name' or 'module:name'")
    module = sys.modules[load_plugins([entry], key)[0]]
    if not hasattr(module, name):
        public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise ConfigError(f"{key}: {entry} has no {name!r}" + (f"; it has {', '.join(public)}" if public else ""))
    return getattr(module, name)
