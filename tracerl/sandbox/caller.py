"""The caller's side (P): :func:`run_job` starts one judge per program; the capability probe."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys

from .limits import Limits
from .view import _outermost, view_plan


# =============================================================================================
# Caller side (P).
# =============================================================================================


_DEFAULT_HIDDEN = ("/root", "/home", "/run", "/var/tmp", "/dev/shm", "/mnt", "/media", "/srv")


def _interpreter(limits):
    """S's interpreter and arguments, its file system view (:func:`.view.view_plan`), and the
    paths the fallback view (no ``pivot_root``) must keep visible."""
    site = limits.site_packages
    plan = view_plan(tuple(site) if isinstance(site, (list, tuple)) else bool(site))
    exe = plan["interpreter"]
    keep = [os.path.realpath(sys.base_prefix), os.path.dirname(os.path.realpath(exe))]
    if site is True:
        keep += [os.path.realpath(sys.prefix), os.path.dirname(os.path.realpath(sys.executable))]
    keep += [os.path.realpath(p) for p in plan["python_path"]]
    return plan, _outermost(keep)


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
    if limits.site_packages is not True and os.path.realpath(sys.prefix) != os.path.realpath(
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


# J's command line: load this package by path, under a private name (the bytecode cache is used,
# unlike for a script; neither ``tracerl`` nor this package's ``__init__`` is run: J needs only
# the judge's modules, which import each other relatively).
_JUDGE_BOOT = (
    "import sys, importlib, importlib.util as u\n"
    "s = u.spec_from_file_location('tracerl_sandbox_judge', sys.argv[1] + '/__init__.py',\n"
    "                              submodule_search_locations=[sys.argv[1]])\n"
    "sys.modules[s.name] = u.module_from_spec(s)\n"
    "m = importlib.import_module(s.name + '.judge')\n"
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

    plan, keep = _interpreter(limits)
    lim = dataclasses.asdict(limits)
    lim["hide_paths"] = list(lim["hide_paths"])
    job = {"method": method, "program": program, "time_limit": float(time_limit),
           "limits": lim, "interpreter": plan["interpreter"],
           "interpreter_args": plan["interpreter_args"], "view": plan,
           "keep_paths": keep, "hide_paths": _hidden_paths(limits, keep)}
    job.update(tests_payload)
    payload = json.dumps(job).encode()
    wall = limits.total_time + 2 * limits.startup_timeout + 10.0
    cmd = [sys.executable, "-I", "-S", "-c", _JUDGE_BOOT,
           os.path.dirname(os.path.abspath(__file__)), str(os.getpid())]
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
        if proc.returncode == -signal.SIGXCPU:
            tail = ["the judge went over its own CPU time limit"] + tail
        elif proc.returncode == -signal.SIGKILL:
            tail = ["the judge was killed (out of memory?)"] + tail
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
