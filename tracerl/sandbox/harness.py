"""S after ``execve``: the in-sandbox harness that loads the program and answers J's requests.

S cannot import this package: J ships this module and the two it imports (:mod:`.protocol`,
:mod:`.procs`) as code (see :mod:`.bootstrap`).  So it imports only the standard library and
those two modules.
"""

from __future__ import annotations

import builtins
import json
import math
import os
import signal
import sys

from .procs import _max_fd, _reap_all
from .protocol import (
    _MEMORY_EXIT,
    _Eof,
    _OverBound,
    _Unencodable,
    _decode,
    _encode,
    _encode_result,
    _recv,
    _send,
)


# =============================================================================================
# S after execve: the in-sandbox harness.  Everything here is as untrusted as the program.
# =============================================================================================


def _child_main(rfd, wfd):
    init = _recv(rfd)
    mode = init["mode"]
    program = init["program"]
    limits = init["limits"]
    cap = int(limits["output_bytes"])
    sys.path.extend(init.get("python_path") or ())  # the packages Limits.site_packages names
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
    try:  # the built-in classes it derives from, so that J's ``except ValueError`` still matches
        bases = [c.__name__ for c in t.__mro__
                 if getattr(c, "__module__", "") == "builtins" and issubclass(c, BaseException)]
    except BaseException:  # noqa: BLE001 - a hostile metaclass
        bases = []
    return {"t": "exc", "type": getattr(t, "__name__", "?"), "msg": msg,
            "exc": isinstance(exc, Exception),
            "builtin": getattr(t, "__module__", "") == "builtins", "bases": bases[:20]}


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
            except _OverBound as exc:  # e.g. range(10**18), an endless generator
                out = {"t": "too_big", "why": str(exc)}
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
