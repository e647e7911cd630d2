"""How J represents a failed call into the program, and maps what a test raised to a verdict."""

from __future__ import annotations

import builtins


class _CandidateFailure(BaseException):
    """A call into the program could not produce a value: timeout, crash, output too large...

    A BaseException, so test code's ``except Exception`` cannot swallow it."""

    def __init__(self, status, detail):
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _Abort(BaseException):
    def __init__(self, status, detail):
        super().__init__(detail)
        self.status = status
        self.detail = detail


_REMOTE_EXC_TYPES = {}

# Exceptions that steer the judge's own control flow: a StopIteration from the program inside
# ``all(map(...))`` would end the test's iteration early (and pass it).  J receives them as a
# RuntimeError, as PEP 479 does for generators.
_CONTROL_FLOW = ("StopIteration", "StopAsyncIteration")


def _builtin_bases(payload):
    """The most specific built-in exception classes among those the program's class derives
    from (its own class first when it is a built-in)."""
    names = payload.get("bases")
    if not isinstance(names, list):
        names = [payload.get("type")] if payload.get("builtin") is True else []
    found = []
    for name in names[:20]:
        cand = getattr(builtins, str(name), None)
        if isinstance(cand, type) and issubclass(cand, Exception):
            found.append(cand)
    return [c for c in found if not any(o is not c and issubclass(o, c) for o in found)]


def _remote_class(name, bases):
    key = (name, bases)
    cls = _REMOTE_EXC_TYPES.get(key)
    if cls is None:
        try:
            cls = type(name, bases, {"_tracerl_remote": True, "__module__": "sandboxed"})
        except TypeError:  # e.g. two bases with conflicting layouts: keep the first
            cls = _remote_class(name, bases[:1]) if len(bases) > 1 else _remote_class(
                name, (Exception,))
        _REMOTE_EXC_TYPES[key] = cls
    return cls


def _remote_exception(payload):
    """Rebuild an exception raised in S: a class of the same name deriving from the same
    built-in exception classes, holding only the message."""
    name = str(payload.get("type", "?"))[:100]
    msg = str(payload.get("msg", ""))[:2000]
    if payload.get("exc") is not True:  # SystemExit, KeyboardInterrupt, ...
        return _CandidateFailure("error", f"program raised {name}: {msg}".rstrip(": "))
    bases = _builtin_bases(payload)
    if any(b.__name__ in _CONTROL_FLOW for b in bases):
        bases = [RuntimeError]
    safe_name = name if name.isidentifier() else "SandboxedException"
    cls = _remote_class(safe_name, tuple(bases) or (Exception,))
    exc = None
    # The first class, walking up, that takes a message alone (UnicodeDecodeError needs five
    # arguments: its SandboxedUnicodeDecodeError becomes a UnicodeError, still a ValueError).
    for base in (cls,) + (bases[0].__mro__[1:] if bases else ()):
        if not issubclass(base, Exception):
            continue
        try:
            exc = (base if base is cls else _remote_class(safe_name, (base,)))(msg)
            break
        except Exception:  # noqa: BLE001
            continue
    if exc is None:
        exc = _remote_class(safe_name, (Exception,))(msg)
    exc._tracerl_type = name
    return exc


def _status_of(exc):
    """Map an exception raised while a test ran (in J) to (status, detail)."""
    if isinstance(exc, (_CandidateFailure, _Abort)):
        return exc.status, exc.detail
    if getattr(exc, "_tracerl_remote", False):
        name = getattr(exc, "_tracerl_type", type(exc).__name__)
        status = "memory" if isinstance(exc, MemoryError) else "error"
        return status, f"program raised {name}: {exc}".rstrip(": ")
    if isinstance(exc, AssertionError):
        msg = str(exc)
        return "failed", f"assertion failed: {msg}" if msg else "assertion failed"
    return "failed", f"test raised {type(exc).__name__}: {str(exc)[:500]}"


def _clip(s, n=200):
    """A short repr; never raises (a 40,000-digit int has no str(), a cycle no end)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = n
    r.maxlist = r.maxtuple = r.maxset = r.maxfrozenset = r.maxdict = r.maxdeque = n // 2
    try:
        s = r.repr(s)
    except Exception:  # noqa: BLE001
        s = f"<{type(s).__name__}>"
    return s if len(s) <= n else s[: n - 3] + "..."
