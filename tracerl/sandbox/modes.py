"""The tests, run in J: assert lists (function mode), HumanEval ``check`` and stdio cases."""

from __future__ import annotations

import builtins
import signal

from .failures import _Abort, _CandidateFailure, _clip, _status_of
from .protocol import _MEMORY_EXIT, _Remote


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
        self.judge.clock.start()
        self.judge.unit_failure = None
        if i in self.unit_ids and not self.judge.calls > self._calls:
            self.judge.last_return = None

    def ok(self, i):
        self._record(i, None)

    def fail(self, i, exc):
        self._record(i, exc)

    def _record(self, i, exc):
        self.judge.clock.stop()
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
        elif judge.sb is not None and judge.sb.memory_exceeded():
            status, detail = "memory", "the run's processes together went over the memory limit"
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
