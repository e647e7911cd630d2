"""The judge J: drives one program's sandbox and runs its tests (:func:`_judge_main`)."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

from .failures import _CandidateFailure, _clip, _remote_exception, _status_of
from .isolation import _path_world_accessible
from .modes import _run_check_mode, _run_function_mode, _run_stdio_mode
from .protocol import (
    _Eof,
    _OverBound,
    _Protocol,
    _Remote,
    _Timeout,
    _TooBig,
    _Unencodable,
    _decode,
    _encode,
)
from .supervisor import _InfraError, _Sandbox
from .syscalls import _PR_SET_CHILD_SUBREAPER, _PR_SET_DUMPABLE, _PR_SET_PDEATHSIG, _prctl


# =============================================================================================
# The judge (J): runs the tests against answers from S.
# =============================================================================================


class _TestClock:
    """A CPU-time budget for J's own work on one test statement.

    Test code runs in J on values the program returned.  Those values are bounded (see
    :mod:`.protocol`), so no single operation on them is long, but a test may loop over them;
    past the budget the statement fails with ``timeout``.  The alarm (SIGPROF, J's CPU time)
    never interrupts an exchange with S: it waits for the exchange to finish."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.armed = False
        self.pending = False
        self.in_exchange = 0
        signal.signal(signal.SIGPROF, self._fire)

    def start(self):
        self.pending = False
        self.armed = True
        signal.setitimer(signal.ITIMER_PROF, self.seconds)

    def stop(self):
        self.armed = False
        signal.setitimer(signal.ITIMER_PROF, 0)

    def _expired(self):
        self.armed = self.pending = False
        return _CandidateFailure("timeout", f"the test's own evaluation took more than "
                                            f"{self.seconds:g} s of the judge's CPU time")

    def _fire(self, signum, frame):
        if not self.armed:
            return
        if self.in_exchange:
            self.pending = True
            return
        raise self._expired()

    def check(self):
        """After an exchange: raise the expiry that arrived during it."""
        if self.pending and self.armed:
            raise self._expired()


class _CappedText:
    """Where test code's prints go (never J's result channel): the last 64 KiB are kept."""

    def __init__(self, cap=64 << 10):
        self.cap = cap
        self.text = ""

    def write(self, s):
        s = str(s)
        self.text = (self.text + s)[-self.cap:]
        return len(s)

    def flush(self):
        pass

    def isatty(self):
        return False


class _Judge:
    """Drives one program's sandbox: lazy start, restart after a crash or timeout, budgets."""

    def __init__(self, spec):
        self.spec = spec
        self.limits = spec["limits"]
        self.sb = None
        self.setup_failure = None
        self.protections = {}
        self.calls = 0
        self.last_return = None
        self.unit_failure = None
        self.infra_error = None
        self.deadline = time.monotonic() + self.limits["total_time"]
        # The harness answers "too_big" past output_bytes + 64 KiB of encoded JSON.
        self.frame_cap = int(self.limits["output_bytes"]) + (128 << 10)
        self.clock = _TestClock(spec["time_limit"] + 1.0)

    # -- lifecycle ------------------------------------------------------------------------------
    def _fail(self, status, detail):
        f = _CandidateFailure(status, detail)
        if self.unit_failure is None:
            self.unit_failure = f
        return f

    def _over_memory(self):
        return self._fail("memory", f"the program's processes together went over the memory limit of "
                                    f"{self.limits['memory_mb']} MiB")

    def ensure(self):
        if self.setup_failure is not None:
            raise self._fail(*self.setup_failure)
        if self.infra_error is not None:
            raise self._fail("error", self.infra_error)
        if self.sb is not None and not self.sb.dead:
            return self.sb
        if time.monotonic() >= self.deadline:
            raise self._fail("timeout", "the program's total time budget is used up")
        try:
            sb = _Sandbox(self.spec)
        except _InfraError as exc:
            self.infra_error = str(exc)
            raise self._fail("error", self.infra_error) from None
        self.protections = sb.protections
        self.sb = sb
        setup = self.limits["setup_time"]
        deadline = min(self.deadline, time.monotonic() + setup)
        try:
            msg = sb.recv(deadline, self.frame_cap)
        except _Timeout:
            sb.kill()
            self.setup_failure = ("timeout", f"loading the program took longer than {setup:g} s")
        except _Eof:
            self.setup_failure = (("memory", "over the memory limit while loading")
                                  if sb.memory_exceeded() else
                                  ("error", f"the program exited while loading "
                                            f"({sb.exit_detail or 'no status'})"))
        except _TooBig:
            sb.kill()
            self.setup_failure = ("output_limit", "oversized message while loading")
        except _Protocol as exc:
            sb.kill()
            self.setup_failure = ("error", f"malformed message while loading: {exc}")
        else:
            t = msg.get("t")
            if t == "ready":
                return sb
            sb.kill()
            if t == "setup_error":
                exc = _remote_exception(msg)
                status, detail = _status_of(exc)
                self.setup_failure = (status, f"while loading: {detail}")
            else:
                self.setup_failure = ("error", f"unexpected message while loading: {t!r}")
        raise self._fail(*self.setup_failure)

    def close(self):
        if self.sb is not None:
            self.sb.kill()
            self.sb = None

    # -- one exchange ---------------------------------------------------------------------------
    def exchange(self, msg, time_limit):
        self.clock.in_exchange += 1
        try:
            return self._exchange(msg, time_limit)
        finally:
            self.clock.in_exchange -= 1

    def _exchange(self, msg, time_limit):
        self.calls += 1  # any interaction with the program makes a statement a real test
        sb = self.ensure()
        now = time.monotonic()
        if now >= self.deadline:
            sb.kill()
            raise self._fail("timeout", "the program's total time budget is used up")
        deadline = min(self.deadline, now + time_limit + 0.25)
        nonce = random.getrandbits(63)
        try:
            sb.send(dict(msg, n=nonce), deadline)
            reply = sb.recv(deadline, self.frame_cap)
            if reply.get("n") != nonce:  # e.g. frames the program wrote ahead of time
                raise _Protocol("answer does not match the request")
            if sb.memory_exceeded():
                # The kernel killed one of the program's processes for the limit during this
                # call, yet the call answered (e.g. the victim was a child that had already
                # reported): the processes together still went over the limit.
                sb.kill()
                raise self._over_memory()
            return reply
        except _Timeout:
            sb.kill()
            if sb.memory_exceeded():  # e.g. a child was killed and the program waited for it
                raise self._over_memory() from None
            if deadline >= self.deadline:
                raise self._fail("timeout", "the program's total time budget is used up") \
                    from None
            raise self._fail("timeout", f"no answer within {time_limit:g} s") from None
        except _Eof:
            if sb.memory_exceeded():
                raise self._over_memory() from None
            raise self._fail("error", f"the program's process ended "
                                      f"({sb.exit_detail or 'no status'})") from None
        except _TooBig as exc:
            sb.kill()
            raise self._fail("output_limit", f"answer of {exc.args[0]} bytes is over the "
                                             f"limit") from None
        except _Protocol as exc:
            sb.kill()
            raise self._fail("error", f"malformed answer: {exc}") from None

    # -- function mode --------------------------------------------------------------------------
    def call(self, name, args, kwargs):
        try:
            enc_args = [_encode(a) for a in args]
            enc_kwargs = {str(k): _encode(v) for k, v in kwargs.items()}
        except _Unencodable as exc:
            self.calls += 1
            raise self._fail("invalid_test", f"unsupported by the sandboxed harness: {exc}") \
                from None
        reply = self.exchange({"t": "call", "name": name, "args": enc_args,
                               "kwargs": enc_kwargs}, self.spec["time_limit"])
        self.clock.check()
        t = reply.get("t")
        if t == "ret":
            try:
                value = _decode(reply.get("v"))
                muts = [(k, _decode(v)) for k, v in reply.get("mut", [])]
            except _OverBound as exc:  # checked before anything is rebuilt
                raise self._fail("output_limit", f"return value: {exc}") from None
            except Exception as exc:  # noqa: BLE001
                self.sb.kill()
                raise self._fail("error", f"malformed return value: {exc}") from None
            for key, new in muts:
                orig = args[key] if type(key) is int and 0 <= key < len(args) else \
                    kwargs.get(key) if type(key) is str else None
                _update_in_place(orig, new)
            self.last_return = f"{name}(...) returned {_clip(value, 120)}"
            return value
        if t == "exc":
            exc = _remote_exception(reply)
            if isinstance(exc, _CandidateFailure):  # SystemExit & co: not catchable by tests
                raise self._fail(exc.status, exc.detail)
            raise exc
        if t == "unencodable":
            raise self._fail("error", str(reply.get("msg", "unencodable return value"))[:500])
        if t == "too_big":
            why = str(reply.get("why") or "over the output limit")[:300]
            raise self._fail("output_limit", f"return value: {why}")
        self.sb.kill()
        raise self._fail("error", f"unexpected answer {t!r}")

    def resolve(self, name):
        reply = self.exchange({"t": "resolve", "name": name}, self.spec["time_limit"])
        t = reply.get("t")
        if t == "callable":
            return _Remote(name, self)
        if t == "missing":
            raise self._fail("error", f"the program does not define {name!r}")
        if t == "module":
            mod = str(reply.get("name", ""))
            if mod in getattr(sys, "stdlib_module_names", ()) or mod.split(".")[0] in getattr(
                    sys, "stdlib_module_names", ()):
                import importlib

                return importlib.import_module(mod)
            raise self._fail("error", f"the tests use module {mod!r} from the program")
        if t == "value":
            try:
                return _decode(reply.get("v"))
            except _OverBound as exc:
                raise self._fail("output_limit", f"value of {name!r}: {exc}") from None
            except Exception as exc:  # noqa: BLE001
                raise self._fail("error", f"malformed value of {name!r}: {exc}") from None
        if t == "opaque":
            raise self._fail("error", f"{name!r} is a {reply.get('type')}, which cannot "
                                      f"leave the sandbox")
        raise self._fail("error", f"unexpected answer {t!r}")


def _update_in_place(orig, new):
    """Mirror an in-place mutation the program made to an argument."""
    t = type(orig)
    if t is not type(new):
        return
    if t is list or t is bytearray:
        orig[:] = new
    elif t is dict or t is set:
        orig.clear()
        orig.update(new)


def _judge_main(argv):
    parent = int(argv[0]) if argv else None
    non_dumpable = False
    try:
        _prctl(_PR_SET_DUMPABLE, 0)
        non_dumpable = True
    except OSError:
        pass
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    try:  # orphaned sandbox processes re-parent to J, which reaps them (no zombies on the host)
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    except OSError:
        pass
    if parent is not None and os.getppid() != parent:
        return 3
    job = json.loads(sys.stdin.buffer.read())
    # The result goes to P on a private copy of fd 1; fds 0 and 1 and sys.stdout become
    # /dev/null and a capped buffer, so a test's print cannot corrupt the result.
    result_fd = os.dup(1)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    limits = dict(job["limits"])
    _limit_judge(limits)
    time_limit = float(job["time_limit"])
    if limits.get("setup_time") is None:
        limits["setup_time"] = time_limit + 1.0
    spec = {
        "mode": "stdio" if job["method"] == "stdio" else "function",
        "program": job["program"],
        "limits": limits,
        "time_limit": time_limit,
        "isolation": limits["isolation"],
        "interpreter": job["interpreter"],
        "interpreter_args": job["interpreter_args"],
        "interpreter_world_readable": _path_world_accessible(job["interpreter"]),
        "view": job["view"],
        "keep_paths": job["keep_paths"],
        "hide_paths": job["hide_paths"],
        "judge_non_dumpable": non_dumpable,
    }
    judge = _Judge(spec)
    captured = _CappedText()
    sys.stdout = sys.stderr = captured
    try:
        if job["method"] == "stdio":
            verdicts = _run_stdio_mode(job, judge)
        elif job["method"] == "check":
            verdicts = _run_check_mode(job, judge)
        else:
            verdicts = _run_function_mode(job, judge)
    finally:
        judge.clock.stop()
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        judge.close()
    protections = dict(judge.protections, judge_limits=_JUDGE_LIMITS)
    result = {"verdicts": verdicts, "protections": protections,
              "infra_error": judge.infra_error}
    data = json.dumps(result).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(result_fd, view):]
    os.close(result_fd)
    return 0


_JUDGE_LIMITS = {}


def _limit_judge(limits):
    """J's own limits: address space and CPU time (soft limits: S sets its own below them)."""
    import resource

    mib = 1 << 20
    cpu = int(limits["total_time"] + 2 * limits["startup_timeout"]) + 10
    for name, value in (("RLIMIT_AS", int(limits["judge_memory_mb"]) * mib),
                        ("RLIMIT_CPU", cpu)):
        res = getattr(resource, name)
        try:
            soft, hard = resource.getrlimit(res)
            v = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(res, (v, hard))
            _JUDGE_LIMITS[name[7:].lower()] = v
        except (OSError, ValueError):
            pass
