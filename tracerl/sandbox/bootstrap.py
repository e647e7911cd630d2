"""How S gets its code: the first lines it runs after ``execve``, and what J sends them.

S cannot import this package: it is a fresh ``python -I -S`` in which the source tree and the
virtual environment may be hidden (see :func:`.caller._hidden_paths`).  So J ships the harness --
:mod:`.harness` and the modules it imports, :mod:`.protocol` and :mod:`.procs` -- as code over
S's request pipe, and the bootstrap makes them modules of a package ``tracerl_sandbox_harness``
again (so that their relative imports resolve).  Those modules import only the standard library
and each other.
"""

from __future__ import annotations

import os

from . import harness, procs, protocol

# S's first code after execve: read the harness (the modules in ``_SHIPPED``, as bytecode from
# J, which S trusts -- nothing ever flows the other way as code or pickle) and run it.  One
# frame: a marshalled tuple of (module name, b"M" + bytecode or b"S" + source), in load order.
_BOOTSTRAP = (
    "import os, sys, types, marshal, importlib.machinery\n"
    "def _r(n):\n"
    "    b = b''\n"
    "    while len(b) < n:\n"
    "        c = os.read(3, n - len(b))\n"
    "        if not c:\n"
    "            os._exit(70)\n"
    "        b += c\n"
    "    return b\n"
    "_p = types.ModuleType('tracerl_sandbox_harness')\n"
    "_p.__path__ = []\n"
    "sys.modules[_p.__name__] = _p\n"
    "for _n, _h in marshal.loads(_r(int.from_bytes(_r(8), 'big'))):\n"
    "    _m = types.ModuleType(_p.__name__ + '.' + _n)\n"
    "    _m.__spec__ = importlib.machinery.ModuleSpec(_m.__name__, None)\n"
    "    _m.__package__ = _p.__name__\n"
    "    sys.modules[_m.__name__] = _m\n"
    "    setattr(_p, _n, _m)\n"
    "    _c = marshal.loads(_h[1:]) if _h[:1] == b'M' else "
    "compile(_h[1:].decode('utf-8'), '<tracerl-sandbox-' + _n + '>', 'exec')\n"
    "    exec(_c, _m.__dict__)\n"
    "del _r, _n, _h, _c, _m\n"
    "_p.harness._child_main(3, 4)\n"
)

# The modules S runs, each after the ones it imports.
_SHIPPED = (protocol, procs, harness)

_HARNESS = None


def _module_payload(path):
    """One module for S: the cached bytecode when it is current, else the source."""
    with open(path, "rb") as fh:
        source = fh.read()
    payload = b"S" + source
    try:
        import importlib.util

        with open(importlib.util.cache_from_source(path), "rb") as fh:
            pyc = fh.read()
        st = os.stat(path)
        flags = int.from_bytes(pyc[4:8], "little")
        if (pyc[:4] == importlib.util.MAGIC_NUMBER and flags == 0
                and int.from_bytes(pyc[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
                and int.from_bytes(pyc[12:16], "little") == st.st_size & 0xFFFFFFFF):
            payload = b"M" + pyc[16:]
    except (OSError, ValueError):
        pass
    return payload


def _harness_payload():
    """The harness for S (one frame's payload; see ``_BOOTSTRAP``), built once per judge."""
    global _HARNESS
    if _HARNESS is None:
        import marshal

        _HARNESS = marshal.dumps(tuple(
            (m.__name__.rpartition(".")[2], _module_payload(os.path.abspath(m.__file__)))
            for m in _SHIPPED))
    return _HARNESS
