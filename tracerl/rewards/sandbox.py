"""Process-isolated execution of untrusted Python programs, and the judge that scores them.

This module is the isolation layer under :mod:`tracerl.rewards.code`.  It uses the standard
library only, because it also runs as a stand-alone script (the *judge*) and, shipped as source
over a pipe, as the harness inside the sandbox.

Process tree for one scored program
-----------------------------------
::

    caller (P) --Popen--> judge (J) --fork--> intermediary (C) --fork--> sandbox (S) [--fork--> run (R)]

* **P**, the calling process (trainer, evaluator, test).  It never runs program or test code.  It
  sends one job (program, tests, limits) to J on J's stdin and reads back one JSON object: the
  verdicts.  J runs in its own session; P kills that whole group when J overruns its wall time.
* **J**, the judge: ``python -I -S sandbox.py --judge <ppid>``.  Trusted: it runs only the
  *test* code (HumanEval ``check``, MBPP ``assert`` lines, stdio comparisons) and holds the
  expected values.  It is made non-dumpable (``PR_SET_DUMPABLE=0``: a same-uid process can
  neither ptrace it nor open its ``/proc/<pid>/mem`` or ``/proc/<pid>/fd``) and dies with P
  (``PR_SET_PDEATHSIG``).
* **C**, the disposable intermediary.  It creates the namespaces, forks S and waits for it.  It
  is S's parent, so ``os.kill(os.getppid(), 9)`` inside S can at worst kill C (outside a pid
  namespace), never J or P; S then dies by its own parent-death signal and the tests it had not
  answered score 0.
* **S**, the sandbox: after the isolation set-up it ``execve``\\ s a *fresh* interpreter
  (``python -I -S``, so no memory of J's job survives in it), which reads this file's source and
  the program from a pipe and runs the program.  For stdio tests S forks one **R** per test.

How verdicts are kept out of the program's reach
------------------------------------------------
The program never judges itself.  S only ever *answers questions*: "call ``f`` with these
arguments and send me the return value", "run the program on this stdin and send me its
stdout".  Return values travel as JSON of plain types (tagged for tuples, sets, dicts with
non-string keys, bytes, big ints...), decoded by J into genuine built-in objects, so an object
whose ``__eq__`` always returns True cannot cross the boundary.  J evaluates the assert
expressions itself, on those values, with its own untouched builtins.  Concretely:

* MBPP-style ``assert f(1, 2) == 3`` lines and HumanEval ``check(candidate)`` functions execute
  *in J*.  Names the tests use that J does not define (``f``; the HumanEval ``candidate``) are
  bound to proxies: calling one sends the arguments to S and returns what S reports.  Each
  top-level statement of ``check`` that contains an ``assert`` is one test; a test that makes no
  call into the program is not counted (HumanEval's ``assert True`` lines), or, in an assert list,
  reported as ``invalid_test``.  Helpers defined in the HumanEval prompt (``poly``,
  ``encode_cyclic``) are J's own trusted copies, so a program cannot redefine the yardstick.
* stdio expected outputs stay in J; S sends R's stdout, J compares.
* Whatever S writes on its channel is, at worst, a claimed return value.  Forging the channel
  (writing frames to inherited fds, pre-sending answers, patching the harness) therefore cannot
  achieve more than computing the right values would; malformed frames are an ``error``.
  ``SystemExit``, ``os._exit``, a killed harness or a timeout make the affected tests fail.
* Expected values are never written into S's environment, arguments or file system, and J, P,
  and C are invisible to S (pid namespace + fresh ``/proc``), or at least not readable by it
  (different uid / non-dumpable).

What is isolated, and how (``protections`` in every result says what was active)
-------------------------------------------------------------------------------
* **Namespaces** (``unshare``): pid, mount, network, IPC, UTS.  As root directly; otherwise
  inside a new *user* namespace (which needs no privileges where the kernel allows unprivileged
  user namespaces).  With a pid namespace S is pid 1: killing S kills every process the program
  started, and the program cannot see or signal anything outside.  The network namespace has only
  a loopback device that is down: no network at all.
* **File system** (mount namespace): everything read-only (``mount_setattr`` recursive, or a
  remount per mount point), a fresh ``/proc``, a private size-capped tmpfs on ``/tmp`` which is
  the working directory and ``$HOME``, and empty read-only tmpfs over the home directories,
  ``/run``, ``/var/tmp``, ``/dev/shm``, ``/mnt``, ``/media``, ``/srv``, the caller's working
  directory, the virtual environment (``sys.prefix``) and ``Limits.hide_paths``.  The
  interpreter's own prefix is bind-mounted back read-only where a hidden directory contains it.
  Files the program writes vanish with the namespace.
* **Privileges**: when root, S switches to a fresh random uid/gid (so ``RLIMIT_NPROC`` binds and
  nothing root-owned is writable or signalable); ``PR_SET_NO_NEW_PRIVS``; ``nosuid`` mounts.
* **Resources** (``setrlimit``): address space (memory), CPU seconds, file size, process
  count, open files, no core dumps.  J enforces wall-time limits per test and for the whole
  program, and a cap on the size of what S sends back (output / return value).
* **Fallbacks**: without namespaces (``Limits.isolation="none"`` or where ``unshare`` is
  refused) only the rlimits, the process-group kill, the uid switch (when root and the
  interpreter is readable by the new uid), the non-dumpable judge and a private temporary
  working directory remain: the program can then read the host's world-readable files, write to
  world-writable directories, use the network, and (same uid, no pid namespace) signal the
  caller.  ``sandbox_capabilities()`` reports which mode a host gets.

Not isolated, even in the best mode: CPU and memory *bandwidth* (no cgroups), the kernel attack
surface (no seccomp filter), read access to world-readable files outside the hidden paths
(system libraries, ``/etc``, ``/sys``), and timing side channels.  Memory is limited per process
(``RLIMIT_AS``), so a program may hold up to ``max_processes`` x ``memory_mb``.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import math
import os
import random
import select
import signal
import sys
import time

__all__ = ["Limits", "run_job", "sandbox_capabilities", "STATUSES"]

# Verdict statuses.
STATUSES = ("passed", "failed", "error", "timeout", "memory", "invalid_test", "output_limit")

# Exit status R uses to say "MemoryError" (stdio runs); anything non-zero is a failure anyway.
_MEMORY_EXIT = 86


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits for one program.  Times in seconds, sizes in MiB unless named bytes.

    ``time_limit``: per test (one call into the program, or one stdio run); ``None`` uses the
    test set's own limit (``CodeTests.time_limit``).  ``setup_time``: for the program's top-level
    code in function mode (``None``: ``time_limit + 1``).  ``total_time``: wall-clock budget for the
    whole program; tests left when it runs out are ``timeout``.  ``startup_timeout`` bounds the
    sandbox's own start (an infrastructure error, not the program's fault, if exceeded).
    ``isolation``: ``"auto"`` (strongest available) or ``"none"`` (rlimits and process groups
    only; for hosts where namespaces misbehave).  ``site_packages``: let the program import the
    caller's virtual environment (also makes the venv readable to it).  ``hide_paths``: extra
    directories to hide (e.g. where datasets with reference outputs live).
    """

    time_limit: float | None = None
    setup_time: float | None = None
    total_time: float = 60.0
    startup_timeout: float = 20.0
    memory_mb: int = 1024
    max_processes: int = 32
    file_size_mb: int = 16
    disk_mb: int = 64
    output_bytes: int = 8 << 20
    open_files: int = 128
    isolation: str = "auto"
    site_packages: bool = False
    hide_paths: tuple = ()

    def __post_init__(self):
        if self.isolation not in ("auto", "none"):
            raise ValueError(f"Limits.isolation must be 'auto' or 'none', got {self.isolation!r}")
        for name in ("total_time", "startup_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0")
        for name in ("memory_mb", "max_processes", "file_size_mb", "disk_mb", "output_bytes",
                     "open_files"):
            if not int(getattr(self, name)) > 0:
                raise ValueError(f"Limits.{name} must be a positive integer")


# =============================================================================================
# Framing: 8-byte big-endian length, then the payload (JSON, or raw source for the bootstrap).
# =============================================================================================


class _Timeout(Exception):
    pass


class _Eof(Exception):
    pass


class _TooBig(Exception):
    pass


class _Protocol(Exception):
    pass


def _write_all(fd, data, deadline=None):
    """Write ``data`` to ``fd``; with a deadline the fd must be non-blocking."""
    view = memoryview(data)
    poller = None
    while view:
        try:
            n = os.write(fd, view)
            view = view[n:]
            continue
        except BlockingIOError:
            pass
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _Eof(str(exc)) from None
        if poller is None:
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
        rem = None if deadline is None else deadline - time.monotonic()
        if rem is not None and rem <= 0:
            raise _Timeout("write")
        events = poller.poll(None if rem is None else max(1, int(rem * 1000)))
        for _, ev in events:
            if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                raise _Eof("peer closed")


def _read_exact(fd, n, deadline=None):
    buf = bytearray()
    poller = None
    while len(buf) < n:
        if deadline is not None:
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            rem = deadline - time.monotonic()
            if rem <= 0 or not poller.poll(max(1, int(rem * 1000))):
                raise _Timeout("read")
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise _Eof("end of stream")
        buf += chunk
    return bytes(buf)


def _send(fd, obj, deadline=None):
    payload = obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()
    _write_all(fd, len(payload).to_bytes(8, "big") + payload, deadline)


def _recv_raw(fd, deadline=None, cap=None):
    n = int.from_bytes(_read_exact(fd, 8, deadline), "big")
    if cap is not None and n > cap:
        raise _TooBig(n)
    return _read_exact(fd, n, deadline)


def _recv(fd, deadline=None, cap=None):
    raw = _recv_raw(fd, deadline, cap)
    try:
        obj = json.loads(raw)
    except Exception as exc:  # noqa: BLE001 - anything unparseable is a protocol error
        raise _Protocol(f"unparseable frame: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise _Protocol("frame is not an object")
    return obj


# =============================================================================================
# Value codec: plain Python values <-> JSON.  The decoder only ever builds built-in types.
# =============================================================================================


class _Unencodable(Exception):
    pass


class _Remote:
    """Judge-side proxy for a name defined by the program: calling it runs the call in S."""

    __slots__ = ("_name", "_judge")

    def __init__(self, name, judge):
        self._name = name
        self._judge = judge

    def __call__(self, *args, **kwargs):
        return self._judge.call(self._name, args, kwargs)

    def __repr__(self):
        return f"<sandboxed {self._name}>"


_MAX_DEPTH = 200
_JSON_INT = 1 << 63


def _encode(v, lenient=False, depth=0):
    """Encode a plain value.  ``lenient`` (the sandbox side) converts subclasses of plain types,
    iterators and numpy scalars to plain values first; the judge side is strict."""
    if depth > _MAX_DEPTH:
        raise _Unencodable("value nested too deeply")
    t = type(v)
    if v is None or t is bool or t is str:
        return v
    if t is int:
        return v if -_JSON_INT < v < _JSON_INT else {"$": "int", "v": format(v, "x")}
    if t is float:
        return v if math.isfinite(v) else {"$": "float", "v": repr(v)}
    d = depth + 1
    if t is list:
        return [_encode(x, lenient, d) for x in v]
    if t is tuple:
        return {"$": "tuple", "v": [_encode(x, lenient, d) for x in v]}
    if t is dict:
        return {"$": "dict", "v": [[_encode(k, lenient, d), _encode(x, lenient, d)]
                                   for k, x in v.items()]}
    if t is set or t is frozenset:
        return {"$": t.__name__, "v": [_encode(x, lenient, d) for x in v]}
    if t is bytes or t is bytearray:
        return {"$": t.__name__, "v": bytes(v).hex()}
    if t is complex:
        return {"$": "complex", "v": [_encode(v.real), _encode(v.imag)]}
    if t is range:
        return {"$": "range", "v": [v.start, v.stop, v.step]}
    mod = getattr(t, "__module__", "")
    if mod == "fractions" and t.__name__ == "Fraction":
        return {"$": "fraction", "v": [format(v.numerator, "x"), format(v.denominator, "x")]}
    if mod == "decimal" and t.__name__ == "Decimal":
        return {"$": "decimal", "v": str(v)}
    if t is _Remote:
        return {"$": "ref", "v": v._name}
    if lenient:
        import collections.abc

        if isinstance(v, collections.abc.Iterator):  # generator, map, zip... stays an iterator
            return {"$": "iter", "v": [_encode(x, True, d) for x in v]}
        return _encode(_plainify(v), True, d)
    raise _Unencodable(f"a value of type {t.__name__} cannot be sent to the sandbox")


def _plainify(v):
    """Sandbox side: turn near-plain values into plain ones (or raise _Unencodable)."""
    if isinstance(v, bool):
        return bool(v)
    if isinstance(v, int):
        return int.__index__(v)
    if isinstance(v, float):
        return float.__float__(v)
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, tuple):  # namedtuple == tuple holds in Python
        return tuple(v)
    if isinstance(v, list):
        return list(v)
    if isinstance(v, dict):  # OrderedDict, defaultdict, Counter compare equal to dicts
        return dict(v)
    if isinstance(v, frozenset):
        return frozenset(v)
    if isinstance(v, set):
        return set(v)
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    t = type(v)
    if getattr(t, "__module__", "") == "numpy" and getattr(v, "ndim", None) == 0:
        return v.item()
    raise _Unencodable(f"returned a value of type {t.__name__}, which cannot leave the sandbox")


def _encode_result(v):
    return _encode(v, lenient=True)


def _decode(o, refs=None, depth=0):
    """Decode a value encoded by :func:`_encode`.  Builds only built-in types (and Fraction,
    Decimal).  ``refs`` resolves ``ref`` tags (sandbox side) to program objects."""
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply")
    t = type(o)
    if o is None or t is bool or t is str or t is int or t is float:
        return o
    d = depth + 1
    if t is list:
        return [_decode(x, refs, d) for x in o]
    if t is not dict:
        raise ValueError(f"unexpected JSON value {t.__name__}")
    tag, v = o.get("$"), o.get("v")
    if tag == "int":
        return int(v, 16)
    if tag == "float":
        if v not in ("nan", "inf", "-inf"):
            raise ValueError("bad float")
        return float(v)
    if tag == "tuple":
        return tuple(_decode(x, refs, d) for x in v)
    if tag == "dict":
        return {_decode(k, refs, d): _decode(x, refs, d) for k, x in v}
    if tag == "set":
        return {_decode(x, refs, d) for x in v}
    if tag == "frozenset":
        return frozenset(_decode(x, refs, d) for x in v)
    if tag == "bytes":
        return bytes.fromhex(v)
    if tag == "bytearray":
        return bytearray.fromhex(v)
    if tag == "complex":
        re_, im = (_decode(x, refs, d) for x in v)
        if type(re_) is not float or type(im) is not float:
            raise ValueError("bad complex")
        return complex(re_, im)
    if tag == "range":
        a, b, c = v
        if not (type(a) is int and type(b) is int and type(c) is int):
            raise ValueError("bad range")
        return range(a, b, c)
    if tag == "iter":
        return iter([_decode(x, refs, d) for x in v])
    if tag == "fraction":
        import fractions

        return fractions.Fraction(int(v[0], 16), int(v[1], 16))
    if tag == "decimal":
        import decimal

        if type(v) is not str or len(v) > 10000:
            raise ValueError("bad decimal")
        return decimal.Decimal(v)
    if tag == "ref" and refs is not None and type(v) is str:
        return refs(v)
    raise ValueError(f"unknown tag {tag!r}")


# =============================================================================================
# Thin libc layer (namespaces, mounts, prctl).  Imported lazily: S never needs it after execve.
# =============================================================================================

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000

_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_NOATIME = 1024
_MS_NODIRATIME = 2048
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MS_RELATIME = 1 << 21

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36

_SYS_MOUNT_SETATTR = 442  # same number on every architecture (new-style syscall table)
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes

        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _errcheck(rc, what):
    if rc != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags):
    import ctypes

    _errcheck(_libc().unshare(ctypes.c_int(flags)), "unshare")


def _mount(source, target, fstype, flags, data=None):
    import ctypes

    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    rc = _libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    _errcheck(rc, f"mount {target}")


def _prctl(option, arg):
    import ctypes

    c = ctypes.c_ulong
    _errcheck(_libc().prctl(ctypes.c_int(option), c(arg), c(0), c(0), c(0)), f"prctl {option}")


def _mount_setattr_readonly_recursive(path):
    import ctypes

    class _MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, 0, 0)
    rc = _libc().syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD),
                         path.encode(), ctypes.c_uint(_AT_RECURSIVE), ctypes.byref(attr),
                         ctypes.c_size_t(ctypes.sizeof(attr)))
    _errcheck(rc, "mount_setattr")


def _statvfs_flags(path):
    """Mount flags to keep when remounting (locked flags must be kept inside a user namespace)."""
    f = os.statvfs(path).f_flag
    out = 0
    for st, ms in ((os.ST_NOSUID, _MS_NOSUID), (os.ST_NODEV, _MS_NODEV),
                   (os.ST_NOEXEC, _MS_NOEXEC), (getattr(os, "ST_NOATIME", 1024), _MS_NOATIME),
                   (getattr(os, "ST_NODIRATIME", 2048), _MS_NODIRATIME),
                   (getattr(os, "ST_RELATIME", 4096), _MS_RELATIME)):
        if f & st:
            out |= ms
    return out


def _remount_all_readonly():
    """Fallback for kernels without mount_setattr: remount every mount point read-only."""
    points = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) > 4:
                points.append(parts[4].replace("\\040", " "))
    failed = []
    for mp in sorted(set(points), key=len):
        try:
            _mount(None, mp, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
                   | _statvfs_flags(mp))
        except OSError:
            failed.append(mp)
    if "/" in failed:
        raise OSError(1, "could not remount / read-only")
    return failed


# =============================================================================================
# Launching one sandbox (runs in J).
# =============================================================================================

# S's first code after execve: read the harness (this module, as bytecode from J, which S
# trusts -- nothing ever flows the other way as code or pickle) and run it.
_BOOTSTRAP = (
    "import os, sys, types, marshal\n"
    "def _r(n):\n"
    "    b = b''\n"
    "    while len(b) < n:\n"
    "        c = os.read(3, n - len(b))\n"
    "        if not c:\n"
    "            os._exit(70)\n"
    "        b += c\n"
    "    return b\n"
    "_m = types.ModuleType('tracerl_sandbox_harness')\n"
    "sys.modules[_m.__name__] = _m\n"
    "_h = _r(int.from_bytes(_r(8), 'big'))\n"
    "_c = marshal.loads(_h[1:]) if _h[:1] == b'M' else "
    "compile(_h[1:].decode('utf-8'), '<tracerl-sandbox-harness>', 'exec')\n"
    "exec(_c, _m.__dict__)\n"
    "del _r, _h, _c\n"
    "_m._child_main(3, 4)\n"
)

_HARNESS = None


def _harness_payload(path):
    """This module for S: the cached bytecode when it is current, else the source."""
    global _HARNESS
    if _HARNESS is None:
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
        _HARNESS = payload
    return _HARNESS

_DEFAULT_HIDDEN = ("/root", "/home", "/run", "/var/tmp", "/dev/shm", "/mnt", "/media", "/srv")


def _sandbox_uid():
    # A fresh uid per sandbox: RLIMIT_NPROC then counts only this sandbox's processes, and
    # "kill every process of this uid" is exactly "kill this sandbox".
    return 1_500_000_000 + random.SystemRandom().randrange(500_000_000)


def _path_world_accessible(path):
    """True when every directory on the way to ``path`` is world-searchable and ``path`` itself
    world-readable (so a fresh uid can execute the interpreter without a mount namespace)."""
    import stat

    path = os.path.realpath(path)
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        p = "/".join(parts[:i]) or "/"
        try:
            mode = os.stat(p).st_mode
        except OSError:
            return False
        need = stat.S_IXOTH if stat.S_ISDIR(mode) else stat.S_IROTH
        if not mode & need:
            return False
    return True


class _Sandbox:
    """One running sandbox, seen from J: a request/answer channel with deadlines."""

    def __init__(self, spec):
        self.spec = spec
        self.dead = False
        self.exit_detail = None
        self.protections = {}
        self.pid_u = None
        self.workdir = None
        limits = spec["limits"]
        root = os.geteuid() == 0
        self.uid = _sandbox_uid() if root else None
        if spec["isolation"] == "none":
            self.workdir = _make_private_workdir(self.uid)
        judge_pid = os.getpid()
        try:
            to_r, to_w = os.pipe()
            fr_r, fr_w = os.pipe()
            info_r, info_w = os.pipe()
            pid_c = os.fork()
        except OSError as exc:
            raise _InfraError(f"cannot start a sandbox: {exc}") from None
        if pid_c == 0:  # C
            code = 127
            try:
                os.close(to_w)
                os.close(fr_r)
                os.close(info_r)
                null = os.open("/dev/null", os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)  # J's result pipe to P must not stay open in C
                os.close(null)
                _intermediary(spec, judge_pid, to_r, fr_w, info_w, self.uid, self.workdir)
            except BaseException:  # noqa: BLE001
                try:
                    import traceback

                    traceback.print_exc()
                except BaseException:  # noqa: BLE001
                    pass
            finally:
                os._exit(code)
        os.close(to_r)
        os.close(fr_w)
        os.close(info_w)
        self.pid_c = pid_c
        self.to_w = to_w
        self.fr_r = fr_r
        os.set_blocking(to_w, False)
        deadline = time.monotonic() + limits["startup_timeout"]
        try:
            info = json.loads(_recv_raw(info_r, deadline, cap=1 << 20))
            os.close(info_r)
            self.pid_u = int(info["pid"])
            self.protections.update(info["report"])
            boot = _recv(fr_r, deadline, cap=1 << 20)
            if boot.get("t") != "boot":
                raise _Protocol(f"{boot.get('error', boot)}")
            self.protections.update(boot.get("report", {}))
            _send(to_w, _harness_payload(spec["harness_path"]), deadline)
            _send(to_w, {"t": "init", "mode": spec["mode"], "program": spec["program"],
                         "limits": limits}, deadline)
            started = _recv(fr_r, deadline, cap=1 << 20)
            if started.get("t") != "started":
                raise _Protocol(f"{started.get('error', started)}")
        except (_Timeout, _Eof, _TooBig, _Protocol, OSError, ValueError, KeyError) as exc:
            self.kill()
            raise _InfraError(f"sandbox failed to start ({type(exc).__name__}: {exc})") from None

    # -- channel ----------------------------------------------------------------------------
    def send(self, obj, deadline):
        try:
            _send(self.to_w, obj, deadline)
        except _Eof:
            self._died()
            raise

    def recv(self, deadline, cap):
        try:
            return _recv(self.fr_r, deadline, cap)
        except _Eof:
            self._died()
            raise

    def _died(self):
        """S closed its channel: collect why (C exits with S's status)."""
        self.dead = True
        detail = self._reap(wait=0.5)
        self.exit_detail = None if detail == "gone" else detail
        self.kill()

    def _reap(self, wait):
        end = time.monotonic() + wait
        while True:
            if not self.pid_c:
                return "gone"
            try:
                pid, status = os.waitpid(self.pid_c, os.WNOHANG)
            except ChildProcessError:
                self.pid_c = None
                return "gone"
            if pid:
                self.pid_c = None
                code = os.waitstatus_to_exitcode(status)
                if code == 200:
                    return "exited (status 0)"
                if code >= 128:
                    try:
                        return f"killed by {signal.Signals(code - 128).name}"
                    except ValueError:
                        return f"exit status {code}"
                return f"exited (status {code})"
            if time.monotonic() >= end:
                return None
            time.sleep(0.005)

    def kill(self):
        """Kill S and everything it started; reap C."""
        self.dead = True
        if self.pid_u:
            for fn in (lambda: os.kill(self.pid_u, signal.SIGKILL),
                       lambda: os.killpg(self.pid_u, signal.SIGKILL)):
                try:
                    fn()
                except OSError:
                    pass
            if not self.protections.get("pid_namespace"):
                if self.uid is not None and self.protections.get("uid_switch"):
                    _kill_uid(self.uid)
                # Until the group is empty: members still exiting become orphans of J (a
                # child subreaper) and are reaped here instead of lingering as zombies.
                end = time.monotonic() + 2.0
                while time.monotonic() < end:
                    _reap_all()
                    try:
                        os.killpg(self.pid_u, signal.SIGKILL)
                    except OSError:
                        break
                    time.sleep(0.005)
        if self.pid_c:
            # C exits by itself once it has reaped S (with a pid namespace: once every process
            # in it is gone); only a C that hangs is killed.
            if self._reap(wait=2.0) is None and self.pid_c:
                try:
                    os.kill(self.pid_c, signal.SIGKILL)
                except OSError:
                    pass
                try:
                    os.waitpid(self.pid_c, 0)
                except ChildProcessError:
                    pass
            self.pid_c = None
        _reap_all()  # orphans re-parented to J (a child subreaper)
        for fd in ("to_w", "fr_r"):
            f = getattr(self, fd, None)
            if f is not None:
                try:
                    os.close(f)
                except OSError:
                    pass
                setattr(self, fd, None)
        if self.workdir:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


class _InfraError(Exception):
    """The sandbox machinery itself failed (not the program's fault)."""


def _make_private_workdir(uid):
    import tempfile

    d = tempfile.mkdtemp(prefix="tracerl-sandbox-")
    if uid is not None:
        try:
            os.chown(d, uid, uid)
        except OSError:
            pass
    os.chmod(d, 0o700)
    return d


def _kill_uid(uid):
    """Kill every process of ``uid`` (a uid used by exactly one sandbox) from a helper."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        except BaseException:  # noqa: BLE001
            pass
        os._exit(0)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _intermediary(spec, judge_pid, to_r, fr_w, info_w, uid, workdir):
    """C: create namespaces, fork S, report S's pid, wait for S, exit with its status."""
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != judge_pid:
        os._exit(1)
    report = {"pid_namespace": False, "mount_namespace": False, "network_namespace": False,
              "ipc_namespace": False, "uts_namespace": False, "user_namespace": False,
              "isolation": spec["isolation"], "errors": []}
    rest = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
    ns_mode = "none"
    if spec["isolation"] == "auto":
        attempts = []
        if os.geteuid() == 0:
            attempts.append(("root", rest))
        else:
            attempts.append(("user", _CLONE_NEWUSER | rest))
        for mode, flags in attempts:
            try:
                _unshare(flags)
                ns_mode = mode
                break
            except OSError as exc:
                report["errors"].append(f"unshare ({mode}): {exc.strerror}")
        if ns_mode == "user":
            try:
                uid_, gid_ = os.getuid(), os.getgid()
                _write_file("/proc/self/setgroups", "deny")
                _write_file("/proc/self/uid_map", f"{uid_} {uid_} 1")
                _write_file("/proc/self/gid_map", f"{gid_} {gid_} 1")
            except OSError as exc:
                report["errors"].append(f"user namespace id maps: {exc}")
        if ns_mode != "none":
            report.update(pid_namespace=True, mount_namespace=True, network_namespace=True,
                          ipc_namespace=True, uts_namespace=True,
                          user_namespace=(ns_mode == "user"))
    report["namespace_mode"] = ns_mode
    pid_u = os.fork()
    if pid_u == 0:  # S (pid 1 of the new pid namespace, when there is one)
        try:
            os.close(info_w)
            _sandbox_exec(spec, to_r, fr_w, ns_mode, uid, workdir)
        except BaseException as exc:  # noqa: BLE001
            try:
                _send(fr_w, {"t": "fatal", "error": f"{type(exc).__name__}: {exc}"})
            except BaseException:  # noqa: BLE001
                pass
        os._exit(71)
    os.close(to_r)
    os.close(fr_w)
    _send(info_w, json.dumps({"pid": pid_u, "report": report}).encode())
    os.close(info_w)
    while True:
        try:
            _, status = os.waitpid(pid_u, 0)
            break
        except ChildProcessError:
            os._exit(200)
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    os._exit(128 + (-code) if code < 0 else (200 if code == 0 else min(code, 127)))


def _write_file(path, text):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _sandbox_exec(spec, to_r, fr_w, ns_mode, uid, workdir):
    """S before execve: file system, limits, privileges, fds; then exec a fresh interpreter."""
    report = {"errors": []}
    os.setsid()
    # Channel fds to 3 (requests in) and 4 (answers out); 0-2 to /dev/null; close the rest.
    import fcntl

    # Duplicates numbered >= 10 first, so no dup2 below can clobber a source.
    hi_r, hi_w = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(fr_w, fcntl.F_DUPFD, 10)
    null = fcntl.fcntl(os.open("/dev/null", os.O_RDWR), fcntl.F_DUPFD, 10)
    for target, src in ((3, hi_r), (4, hi_w), (0, null), (1, null), (2, null)):
        os.dup2(src, target)
    os.closerange(5, _max_fd())
    try:
        _sandbox_setup_and_exec(spec, ns_mode, uid, workdir, report)
    except BaseException as exc:  # noqa: BLE001 - J reports it as an infrastructure error
        _send(4, {"t": "fatal", "error": f"{type(exc).__name__}: {exc}"})
        os._exit(71)


def _sandbox_setup_and_exec(spec, ns_mode, uid, workdir, report):
    limits = spec["limits"]
    in_ns = ns_mode != "none"

    # -- file system ----------------------------------------------------------------------------
    if in_ns:
        _setup_filesystem(spec, report)
        cwd = "/tmp"
    else:
        cwd = workdir
        report.update(readonly_filesystem=False, private_tmp=False, private_proc=False,
                      hidden_paths=[])

    # -- resource limits ------------------------------------------------------------------------
    import resource

    mib = 1 << 20
    cpu = int(math.ceil(limits["total_time"])) + 1
    rl = {
        "RLIMIT_AS": limits["memory_mb"] * mib,
        "RLIMIT_CPU": cpu,
        "RLIMIT_FSIZE": limits["file_size_mb"] * mib,
        "RLIMIT_NOFILE": limits["open_files"],
        "RLIMIT_CORE": 0,
    }
    root_switch = os.geteuid() == 0 and uid is not None
    if not in_ns and os.geteuid() == 0 and not spec["interpreter_world_readable"]:
        root_switch = False
        report["errors"].append("interpreter not readable by a fresh uid: staying root")
    nproc_binds = False
    if root_switch or (os.geteuid() != 0 and ns_mode == "user"):
        rl["RLIMIT_NPROC"] = limits["max_processes"]
        nproc_binds = True
    elif os.geteuid() != 0:
        # Same uid as the caller, no namespaces: the count includes the caller's own tasks.
        rl["RLIMIT_NPROC"] = _count_user_tasks(os.getuid()) + limits["max_processes"]
        nproc_binds = True
    applied = {}
    for name, value in rl.items():
        res = getattr(resource, name)
        try:
            hard = resource.getrlimit(res)[1]
            v = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(res, (v, v))
            applied[name[7:].lower()] = v
        except (OSError, ValueError) as exc:
            report["errors"].append(f"setrlimit {name}: {exc}")
    report["rlimits"] = applied

    # -- privileges -----------------------------------------------------------------------------
    report["uid_switch"] = False
    if root_switch:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            report["uid_switch"] = True
            report["uid"] = uid
        except OSError as exc:
            report["errors"].append(f"uid switch: {exc}")
            nproc_binds = False
    report["process_limit_enforced"] = nproc_binds
    try:
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        report["no_new_privs"] = True
    except OSError:
        report["no_new_privs"] = False
    try:  # after the uid switch: changing credentials clears the parent-death signal
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    report["kill_scope"] = ("pid-namespace" if in_ns else
                            "uid" if report["uid_switch"] else "process-group")
    report["network_isolated"] = in_ns
    report["judge_non_dumpable"] = spec.get("judge_non_dumpable", False)
    os.chdir(cwd)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd,
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    _send(4, {"t": "boot", "report": report})
    argv = [spec["interpreter"]] + spec["interpreter_args"] + ["-c", _BOOTSTRAP]
    os.execve(spec["interpreter"], argv, env)


def _max_fd():
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return soft if soft != resource.RLIM_INFINITY and soft < (1 << 20) else 1 << 16
    except Exception:  # noqa: BLE001
        return 1 << 16


def _count_user_tasks(uid):
    n = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as fh:
                text = fh.read()
        except OSError:
            continue
        real_uid = threads = None
        for line in text.splitlines():
            if line.startswith("Uid:"):
                real_uid = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
        if real_uid == uid:
            n += threads or 1
    return n


def _setup_filesystem(spec, report):
    """Read-only root, fresh /proc, hidden directories, private writable /tmp."""
    errors = report["errors"]
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we do propagates to the host
    keep = []
    for k in spec["keep_paths"]:
        try:
            keep.append((k, os.open(k, os.O_PATH | os.O_DIRECTORY)))
        except OSError as exc:
            errors.append(f"keep {k}: {exc}")
    ro = False
    try:
        _mount_setattr_readonly_recursive("/")
        ro = True
    except OSError as exc:
        errors.append(f"mount_setattr: {exc}")
        try:
            failed = _remount_all_readonly()
            ro = True
            if failed:
                errors.append(f"could not remount read-only: {failed[:10]}")
        except OSError as exc2:
            errors.append(f"remount read-only: {exc2}")
    report["readonly_filesystem"] = ro
    hidden = []
    tmp_mib = spec["limits"]["disk_mb"]
    targets = sorted(set(spec["hide_paths"]) | {"/tmp"}, key=lambda p: (p.count("/"), p))
    for h in targets:
        if not os.path.isdir(h) or os.path.islink(h):
            continue
        writable = h == "/tmp"
        data = f"size={tmp_mib}m,mode=1777" if writable else "size=1m,mode=755"
        try:
            _mount("tmpfs", h, "tmpfs", _MS_NOSUID | _MS_NODEV, data)
        except OSError as exc:
            errors.append(f"hide {h}: {exc}")
            continue
        for k, fd in keep:
            if k == h or k.startswith(h.rstrip("/") + "/"):
                try:
                    os.makedirs(k, exist_ok=True)
                    _mount(f"/proc/self/fd/{fd}", k, None, _MS_BIND | _MS_REC)
                    _mount(None, k, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID
                           | _MS_NODEV | _statvfs_flags(k))
                except OSError as exc:
                    errors.append(f"keep {k}: {exc}")
        if not writable:
            try:
                _mount(None, h, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV,
                       "size=1m,mode=755")
            except OSError as exc:
                errors.append(f"read-only {h}: {exc}")
        hidden.append(h)
    report["hidden_paths"] = [h for h in hidden if h != "/tmp"]
    report["private_tmp"] = "/tmp" in hidden
    for _, fd in keep:
        os.close(fd)
    try:
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        report["private_proc"] = True
    except OSError as exc:
        errors.append(f"mount /proc: {exc}")
        try:  # cannot get a fresh /proc: at least hide the host's
            _mount("tmpfs", "/proc", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_RDONLY, "size=4k")
            report["private_proc"] = "hidden"
        except OSError as exc2:
            errors.append(f"hide /proc: {exc2}")
            report["private_proc"] = False


# =============================================================================================
# S after execve: the in-sandbox harness.  Everything here is as untrusted as the program.
# =============================================================================================


def _child_main(rfd, wfd):
    init = _recv(rfd)
    mode = init["mode"]
    program = init["program"]
    limits = init["limits"]
    cap = int(limits["output_bytes"])
    if not hasattr(builtins, "exit"):  # site is not imported (-S): programs still call exit()
        def _exit(code=None):
            raise SystemExit(code)

        builtins.exit = builtins.quit = _exit
    _send(wfd, {"t": "started"})
    if mode == "stdio":
        _child_stdio(rfd, wfd, program, limits, cap)
    else:
        _child_function(rfd, wfd, program, cap)
    os._exit(0)


def _exc_payload(exc):
    try:
        msg = str(exc)[:2000]
    except BaseException:  # noqa: BLE001
        msg = "<unprintable>"
    t = type(exc)
    return {"t": "exc", "type": getattr(t, "__name__", "?"), "msg": msg,
            "exc": isinstance(exc, Exception), "builtin": getattr(t, "__module__", "") == "builtins"}


def _reply(wfd, obj, cap, nonce=None):
    if nonce is not None:
        obj = dict(obj, n=nonce)
    try:
        payload = json.dumps(obj, ensure_ascii=False).encode()
    except BaseException as exc:  # noqa: BLE001
        payload = json.dumps(_exc_payload(exc)).encode()
    if len(payload) > cap + 65536:
        payload = json.dumps({"t": "too_big", "size": len(payload), "n": nonce}).encode()
    _send(wfd, payload)


def _child_function(rfd, wfd, program, cap):
    ns = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(program, "<solution>", "exec"), ns)
    except BaseException as exc:  # noqa: BLE001 - SystemExit included: a failed load
        _reply(wfd, dict(_exc_payload(exc), t="setup_error"), cap)
        return
    _reply(wfd, {"t": "ready"}, cap)

    def ref(name):
        if name not in ns:
            raise NameError(f"name {name!r} is not defined")
        return ns[name]

    while True:
        try:
            req = _recv(rfd)
        except _Eof:
            return
        t = req.get("t")
        nonce = req.get("n")
        if t == "resolve":
            name = req["name"]
            if name not in ns:
                _reply(wfd, {"t": "missing"}, cap, nonce)
                continue
            obj = ns[name]
            if type(obj).__name__ == "module":
                _reply(wfd, {"t": "module", "name": getattr(obj, "__name__", "")}, cap, nonce)
            elif callable(obj):
                _reply(wfd, {"t": "callable"}, cap, nonce)
            else:
                try:
                    _reply(wfd, {"t": "value", "v": _encode_result(obj)}, cap, nonce)
                except BaseException:  # noqa: BLE001
                    _reply(wfd, {"t": "opaque", "type": type(obj).__name__}, cap, nonce)
        elif t == "call":
            try:
                fn = ref(req["name"])
                args = [_decode(a, ref) for a in req["args"]]
                kwargs = {k: _decode(v, ref) for k, v in req["kwargs"].items()}
            except BaseException as exc:  # noqa: BLE001
                _reply(wfd, _exc_payload(exc), cap, nonce)
                continue
            try:
                result = fn(*args, **kwargs)
                out = {"t": "ret", "v": _encode_result(result)}
                result = None
                mut = []
                for i, a in enumerate(args):
                    if type(a) in (list, dict, set, bytearray):
                        mut.append([i, _encode(a, lenient=True)])
                for k, a in kwargs.items():
                    if type(a) in (list, dict, set, bytearray):
                        mut.append([k, _encode(a, lenient=True)])
                out["mut"] = mut
            except _Unencodable as exc:
                out = {"t": "unencodable", "msg": str(exc)}
            except BaseException as exc:  # noqa: BLE001 - SystemExit in the function: an error
                result = None
                out = _exc_payload(exc)
            _reply(wfd, out, cap, nonce)
        else:
            return


def _child_stdio(rfd, wfd, program, limits, cap):
    try:
        code = compile(program, "<solution>", "exec")
    except BaseException as exc:  # noqa: BLE001
        _reply(wfd, dict(_exc_payload(exc), t="setup_error"), cap)
        return
    _reply(wfd, {"t": "ready"}, cap)
    import resource

    while True:
        try:
            req = _recv(rfd)
        except _Eof:
            return
        if req.get("t") != "run":
            return
        data = req["stdin"].encode("utf-8", "surrogateescape")
        fin = _anon_file("stdin")
        view = memoryview(data)
        while view:
            view = view[os.write(fin, view):]
        os.lseek(fin, 0, os.SEEK_SET)
        fout, ferr = _anon_file("stdout"), _anon_file("stderr")
        cpu = int(math.ceil(float(req["time_limit"]))) + 1
        pid = os.fork()
        if pid == 0:  # R: one run of the program
            code_ = 1
            try:
                os.setpgid(0, 0)
                os.dup2(fin, 0)
                os.dup2(fout, 1)
                os.dup2(ferr, 2)
                os.closerange(3, _max_fd())
                resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
                code_ = _run_main(code)
            finally:
                os._exit(code_)
        status = _wait_child(pid)
        if os.getpid() == 1:  # pid namespace: kill anything the run left behind
            try:
                os.kill(-1, signal.SIGKILL)
            except OSError:
                pass
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        _reap_all()
        size = os.fstat(fout).st_size
        over = size > cap or size >= int(limits["file_size_mb"]) << 20
        out = b"" if over else os.pread(fout, size, 0)
        esize = os.fstat(ferr).st_size
        err = os.pread(ferr, 2000, max(0, esize - 2000))
        for f in (fin, fout, ferr):
            os.close(f)
        code_ = os.waitstatus_to_exitcode(status)
        _reply(wfd, {"t": "done", "code": code_, "over": over,
                     "out": out.decode("utf-8", "replace"),
                     "err": err.decode("utf-8", "replace")}, cap, req.get("n"))


def _anon_file(name):
    try:
        return os.memfd_create(name)
    except (AttributeError, OSError):
        import tempfile

        fd, path = tempfile.mkstemp(dir=".")
        os.unlink(path)
        return fd


def _wait_child(pid):
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue


def _reap_all():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return


def _run_main(code):
    """R: run the compiled program as ``__main__`` on fds 0-2; return the exit status."""
    sys.stdin = open(0, "r", encoding="utf-8", errors="replace", closefd=False)
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)
    ns = {"__name__": "__main__", "__builtins__": builtins}
    status = 0
    try:
        exec(code, ns)
    except SystemExit as exc:
        c = exc.code
        if c is None:
            status = 0
        elif isinstance(c, int):
            status = c & 0xFF
        else:
            try:
                print(c, file=sys.stderr)
            except BaseException:  # noqa: BLE001
                pass
            status = 1
    except MemoryError:
        status = _MEMORY_EXIT
    except BaseException:  # noqa: BLE001
        try:
            import traceback

            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            status = status or 1
    return status


# =============================================================================================
# The judge (J): runs the tests against answers from S.
# =============================================================================================


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

    # -- lifecycle ------------------------------------------------------------------------------
    def _fail(self, status, detail):
        f = _CandidateFailure(status, detail)
        if self.unit_failure is None:
            self.unit_failure = f
        return f

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
            self.setup_failure = ("error", f"the program exited while loading "
                                           f"({sb.exit_detail or 'no status'})")
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
            return reply
        except _Timeout:
            sb.kill()
            if deadline >= self.deadline:
                raise self._fail("timeout", "the program's total time budget is used up") \
                    from None
            raise self._fail("timeout", f"no answer within {time_limit:g} s") from None
        except _Eof:
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
        t = reply.get("t")
        if t == "ret":
            try:
                value = _decode(reply.get("v"))
                muts = [(k, _decode(v)) for k, v in reply.get("mut", [])]
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
            raise self._fail("output_limit", "return value over the output limit")
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


class _JudgeNamespace(dict):
    """Globals for test code: names it does not define resolve to the program's (via S)."""

    def __init__(self, judge):
        super().__init__()
        self.judge = judge
        self.resolving = False

    def __missing__(self, key):
        if not self.resolving or key.startswith("__") or hasattr(builtins, key):
            raise KeyError(key)
        value = self.judge.resolve(key)
        self[key] = value
        return value


class _Units:
    """Records test outcomes while test code runs in J.

    ``unit_ids`` maps a statement number to its test number; other statements are set-up (a
    failing set-up statement aborts the rest).  Calls made by set-up statements count for the
    next test (``x = candidate(2)`` then ``assert x == 4``).  A test that never interacted with
    the program is dropped when it passes and ``drop_callless`` (HumanEval's ``assert True,
    "..."``), else reported ``invalid_test``."""

    def __init__(self, judge, unit_ids, lines, drop_callless):
        self.judge = judge
        self.unit_ids = unit_ids
        self.lines = lines
        self.drop_callless = drop_callless
        self.results = {}
        self._calls = judge.calls  # interactions before the current test (and its set-up)

    def begin(self, i):
        self.judge.unit_failure = None
        if i in self.unit_ids and not self.judge.calls > self._calls:
            self.judge.last_return = None

    def ok(self, i):
        self._record(i, None)

    def fail(self, i, exc):
        self._record(i, exc)

    def _record(self, i, exc):
        made_calls = self.judge.calls > self._calls
        if i in self.unit_ids:
            self._calls = self.judge.calls
        failure, self.judge.unit_failure = self.judge.unit_failure, None
        if failure is not None:  # a crash/timeout/bad value: counts even if the test caught it
            status, detail = failure.status, failure.detail
        elif exc is None:
            status, detail = "passed", ""
        else:
            status, detail = _status_of(exc)
        where = f"line {self.lines.get(i, '?')}"
        if not made_calls and failure is None:
            if status == "passed":
                if i not in self.unit_ids or self.drop_callless:
                    return
                status, detail = "invalid_test", "test does not call the program"
            else:
                status, detail = "invalid_test", f"test fails without calling the program: " \
                                                 f"{detail}"
        if i not in self.unit_ids:
            if status != "passed":
                raise _Abort(status, f"{where}: set-up statement failed: {detail}")
            return
        if status == "failed" and self.judge.last_return:
            detail = f"{detail} (last call: {self.judge.last_return})"
        self.results[self.unit_ids[i]] = (status, f"{where}: {detail}" if detail else "")


_UNIT_TEMPLATE = """
__judge__.begin(0)
try:
    pass
except BaseException as __judge_exc__:
    __judge__.fail(0, __judge_exc__)
else:
    __judge__.ok(0)
"""


def _instrument(stmts):
    """Wrap each statement so that its outcome is recorded and the next one still runs."""
    import ast

    out = []
    for i, stmt in enumerate(stmts):
        tmpl = ast.parse(_UNIT_TEMPLATE).body
        begin, trynode = tmpl
        begin.value.args[0] = ast.Constant(i)
        trynode.body = [stmt]
        trynode.handlers[0].body[0].value.args[0] = ast.Constant(i)
        trynode.orelse[0].value.args[0] = ast.Constant(i)
        for node in tmpl:
            ast.copy_location(node, stmt)
        out.extend(tmpl)
    return out


def _has_assert(node):
    import ast

    return any(isinstance(n, ast.Assert) for n in ast.walk(node))


def _run_function_mode(job, judge):
    """MBPP / upstream ``test_list``: each entry is one test (usually ``assert f(x) == y``)."""
    import ast

    verdicts = {}
    ns = _JudgeNamespace(judge)
    ns["__name__"] = "__tests__"
    ns.resolving = True
    units = _Units(judge, {}, {}, drop_callless=False)
    for index, src in job["asserts"]:
        try:
            tree = ast.parse(src, mode="exec")
            code = compile(tree, f"<test {index}>", "exec")
        except (SyntaxError, ValueError) as exc:
            verdicts[index] = ("invalid_test", f"test does not parse: {exc}")
            continue
        if not _has_assert(tree):
            verdicts[index] = ("invalid_test", "test contains no assert")
            continue
        units.unit_ids = {index: index}
        units.lines = {index: 1}
        units.results = {}
        units.begin(index)
        try:
            exec(code, ns)
        except BaseException as exc:  # noqa: BLE001
            units.fail(index, exc)
        else:
            units.ok(index)
        status, detail = units.results[index]
        verdicts[index] = (status, detail[len("line 1: "):] if detail.startswith("line 1: ")
                           else detail)
    return [{"index": i, "status": s, "detail": d} for i, (s, d) in sorted(verdicts.items())]


def _run_check_mode(job, judge):
    """HumanEval: ``check(candidate)`` runs in J; each top-level statement with an assert is a
    test; ``candidate`` and names from the program are proxies into S."""
    import ast

    entry = job["entry_point"]
    try:
        tree = ast.parse(job["check_code"])
    except (SyntaxError, ValueError) as exc:
        return [{"index": 0, "status": "invalid_test", "detail": f"test does not parse: {exc}"}]
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if not checks or not entry or not str(entry).isidentifier():
        return [{"index": 0, "status": "invalid_test",
                 "detail": "no `def check(candidate)` or no valid entry point"}]
    fn = checks[-1]
    unit_ids, lines = {}, {}
    for i, stmt in enumerate(fn.body):
        lines[i] = stmt.lineno
        if _has_assert(stmt):
            unit_ids[i] = len(unit_ids)
    if not unit_ids:
        return [{"index": 0, "status": "invalid_test", "detail": "check() has no assert"}]
    fn.body = _instrument(fn.body)
    ast.fix_missing_locations(tree)
    ns = _JudgeNamespace(judge)
    ns["__name__"] = "__tests__"
    prelude = job.get("prelude") or ""
    if prelude:
        try:  # trusted helpers (HumanEval prompt): J's own copies
            exec(compile(prelude, "<prompt>", "exec"), ns)
        except Exception as exc:  # noqa: BLE001
            return [{"index": 0, "status": "invalid_test",
                     "detail": f"the prompt code does not run: {type(exc).__name__}: {exc}"}]
    candidate = _Remote(entry, judge)
    ns[entry] = candidate
    units = _Units(judge, unit_ids, lines, drop_callless=True)
    ns["__judge__"] = units
    try:
        exec(compile(tree, "<check>", "exec"), ns)
    except Exception as exc:  # noqa: BLE001
        return [{"index": 0, "status": "invalid_test",
                 "detail": f"the test module does not run: {type(exc).__name__}: {exc}"}]
    ns.resolving = True
    abort = None
    try:
        ns["check"](candidate)
    except _Abort as exc:
        abort = exc
    except BaseException as exc:  # noqa: BLE001 - cannot happen with the instrumentation
        abort = _Abort(*_status_of(exc))
    verdicts = []
    for i, u in sorted(unit_ids.items(), key=lambda kv: kv[1]):
        if u in units.results:
            status, detail = units.results[u]
        elif abort is not None:
            status, detail = abort.status, f"not run: {abort.detail}"
        else:
            continue  # check() returned early
        verdicts.append({"index": len(verdicts), "status": status, "detail": detail})
    if not verdicts:
        verdicts = [{"index": 0, "status": "invalid_test",
                     "detail": "check() made no call into the program"}]
    return verdicts


def _normalize_output(text):
    lines = text.replace("\r\n", "\n").split("\n")
    lines = [ln.rstrip() for ln in lines]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def _clip(s, n=200):
    s = repr(s)
    return s if len(s) <= n else s[: n - 3] + "..."


def _run_stdio_mode(job, judge):
    verdicts = []
    for index, stdin, expected in job["cases"]:
        judge.unit_failure = None
        try:
            reply = judge.exchange({"t": "run", "stdin": stdin, "time_limit": judge.spec[
                "time_limit"]}, judge.spec["time_limit"])
        except _CandidateFailure as exc:
            verdicts.append({"index": index, "status": exc.status, "detail": exc.detail})
            continue
        if reply.get("t") != "done":
            judge.sb.kill()
            verdicts.append({"index": index, "status": "error",
                             "detail": f"unexpected answer {reply.get('t')!r}"})
            continue
        code, out, err = reply.get("code"), reply.get("out"), reply.get("err", "")
        if reply.get("over") is True:
            status, detail = "output_limit", "output over the limit"
        elif type(code) is not int or type(out) is not str:
            status, detail = "error", "malformed answer"
        elif code == -int(signal.SIGXFSZ):
            status, detail = "output_limit", "output/file over the size limit"
        elif code == -int(signal.SIGXCPU):
            status, detail = "timeout", "CPU time limit"
        elif code == _MEMORY_EXIT:
            status, detail = "memory", "MemoryError"
        elif code != 0:
            tail = str(err).strip().splitlines()[-1:] if err else []
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            status, detail = "error", f"{how}{': ' + tail[0][:300] if tail else ''}"
        elif _normalize_output(out) == _normalize_output(expected):
            status, detail = "passed", ""
        else:
            status, detail = "failed", (f"expected {_clip(_normalize_output(expected))}, got "
                                        f"{_clip(_normalize_output(out))}")
        verdicts.append({"index": index, "status": status, "detail": detail})
    return verdicts


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
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    limits = dict(job["limits"])
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
        "keep_paths": job["keep_paths"],
        "hide_paths": job["hide_paths"],
        "harness_path": os.path.abspath(__file__),
        "judge_non_dumpable": non_dumpable,
    }
    judge = _Judge(spec)
    try:
        if job["method"] == "stdio":
            verdicts = _run_stdio_mode(job, judge)
        elif job["method"] == "check":
            verdicts = _run_check_mode(job, judge)
        else:
            verdicts = _run_function_mode(job, judge)
    finally:
        judge.close()
    result = {"verdicts": verdicts, "protections": judge.protections,
              "infra_error": judge.infra_error}
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()
    return 0


# =============================================================================================
# Caller side (P).
# =============================================================================================


def _interpreter(limits):
    """The interpreter S runs, its arguments, and the paths it needs visible."""
    base = os.path.realpath(sys.base_prefix)
    if limits.site_packages:
        exe = sys.executable
        keep = [base, os.path.realpath(sys.prefix),
                os.path.dirname(os.path.realpath(sys.executable))]
        return exe, ["-I"], _outermost(keep)
    exe = os.path.realpath(sys.executable)
    return exe, ["-I", "-S"], _outermost([base, os.path.dirname(exe)])


def _outermost(paths):
    paths = sorted(set(paths))
    return [p for p in paths if not any(p.startswith(q + "/") for q in paths if q != p)]


def _hidden_paths(limits, keep):
    hide = set(_DEFAULT_HIDDEN)
    home = os.path.expanduser("~")
    if home and home != "/":
        hide.add(home)
    try:
        cwd = os.path.realpath(os.getcwd())
        if cwd != "/":
            hide.add(cwd)
    except OSError:
        pass
    if not limits.site_packages and os.path.realpath(sys.prefix) != os.path.realpath(
            sys.base_prefix):
        hide.add(os.path.realpath(sys.prefix))
    hide.update(os.path.realpath(p) for p in limits.hide_paths)
    # Never hide a directory that is (or is inside) the interpreter's own prefix: hiding a
    # parent is fine, the prefix is bind-mounted back.
    out = []
    for h in sorted(hide):
        h = os.path.realpath(h)
        if h in ("/", "/usr", "/lib", "/lib64", "/bin", "/etc", "/proc", "/dev", "/sys"):
            continue
        if any(h == k or h.startswith(k + "/") for k in keep):
            continue  # inside the interpreter's prefix
        out.append(h)
    return out


# J's command line: load this file by path (its bytecode cache is used, unlike for a script).
_JUDGE_BOOT = (
    "import sys, importlib.util as u\n"
    "s = u.spec_from_file_location('tracerl_sandbox_judge', sys.argv[1])\n"
    "m = u.module_from_spec(s)\n"
    "sys.modules[s.name] = m\n"
    "s.loader.exec_module(m)\n"
    "sys.exit(m._judge_main(sys.argv[2:]))\n"
)


def run_job(program, method, tests_payload, time_limit, limits):
    """Run one program against one test set in a fresh judge; return the judge's result dict.

    ``method`` is ``"function"`` (``tests_payload = {"asserts": [[index, src], ...]}``),
    ``"check"`` (``{"check_code", "entry_point", "prelude"}``) or ``"stdio"``
    (``{"cases": [[index, stdin, expected], ...]}``).  Returns ``{"verdicts": [...],
    "protections": {...}, "infra_error": str | None}``; never raises for a misbehaving program.
    """
    import subprocess

    exe, args, keep = _interpreter(limits)
    lim = dataclasses.asdict(limits)
    lim["hide_paths"] = list(lim["hide_paths"])
    job = {"method": method, "program": program, "time_limit": float(time_limit),
           "limits": lim, "interpreter": exe, "interpreter_args": args,
           "keep_paths": keep, "hide_paths": _hidden_paths(limits, keep)}
    job.update(tests_payload)
    payload = json.dumps(job).encode()
    wall = limits.total_time + 2 * limits.startup_timeout + 10.0
    cmd = [sys.executable, "-I", "-S", "-c", _JUDGE_BOOT, os.path.abspath(__file__),
           str(os.getpid())]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                                env=env, cwd="/")
    except OSError as exc:
        return {"verdicts": [], "protections": {}, "infra_error": f"cannot start judge: {exc}"}
    try:
        out, err = proc.communicate(payload, timeout=wall)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        out, err = proc.communicate()
        return {"verdicts": [], "protections": {},
                "infra_error": f"judge exceeded its wall time of {wall:g} s"}
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
    try:
        result = json.loads(out)
        if not isinstance(result, dict) or not isinstance(result.get("verdicts"), list):
            raise ValueError("bad result")
        return result
    except ValueError:
        tail = err.decode("utf-8", "replace").strip().splitlines()[-3:]
        return {"verdicts": [], "protections": {},
                "infra_error": f"judge failed (status {proc.returncode}): {' | '.join(tail)}"}


_CAPS = {}


def sandbox_capabilities(limits=None, refresh=False):
    """What isolation this host gives a sandbox: runs one tiny probe program (cached).

    Returns the ``protections`` dict (namespaces, read-only file system, hidden paths, uid
    switch, rlimits, kill scope, network isolation, errors) plus ``works`` (the probe scored
    correctly)."""
    limits = limits or Limits()
    key = limits.isolation
    if key in _CAPS and not refresh:
        return dict(_CAPS[key])
    res = run_job("def f():\n    return 1\n", "function", {"asserts": [[0, "assert f() == 1"]]},
                  1.0, limits)
    caps = dict(res.get("protections") or {})
    v = res.get("verdicts") or []
    caps["works"] = bool(v) and v[0].get("status") == "passed" and not res.get("infra_error")
    if res.get("infra_error"):
        caps["infra_error"] = res["infra_error"]
    _CAPS[key] = caps
    return dict(caps)


if __name__ == "__main__":  # manual use: python sandbox.py --judge <parent pid> < job.json
    if len(sys.argv) >= 2 and sys.argv[1] == "--judge":
        sys.exit(_judge_main(sys.argv[2:]))
    print("usage: sandbox.py --judge <parent pid> < job.json  (internal; see "
          "tracerl.rewards.code)", file=sys.stderr)
    sys.exit(2)
