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


def _remote_exception(payload):
    name = str(payload.get("type", "?"))[:100]
    msg = str(payload.get("msg", ""))[:2000]
    base = None
    if payload.get("builtin") is True:
        cand = getattr(builtins, name, None)
        if isinstance(cand, type) and issubclass(cand, Exception):
            base = cand
    if base is None:
        if payload.get("exc") is not True:  # SystemExit, KeyboardInterrupt, ...
            return _CandidateFailure("error", f"program raised {name}: {msg}".rstrip(": "))
        base = Exception
    cls = _REMOTE_EXC_TYPES.get(base)
    if cls is None:
        cls = type("Sandboxed" + base.__name__, (base,), {"_tracerl_remote": True})
        _REMOTE_EXC_TYPES[base] = cls
    try:
        exc = cls(msg)
    except Exception:  # noqa: BLE001 - e.g. UnicodeDecodeError needs 5 arguments
        cls = _REMOTE_EXC_TYPES.setdefault(
            Exception, type("SandboxedException", (Exception,), {"_tracerl_remote": True}))
        exc = cls(msg)
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
    s = repr(s)
    return s if len(s) <= n else s[: n - 3] + "..."
