"""The sandbox against what an RL policy (or an attacker) tries, and honest programs that must
behave as under plain Python.  One test per finding of the reliability review; every program and
input here was written for these tests.

Where a protection depends on the host (a mount namespace, a memory cgroup), the test checks it
where the sandbox reports it active and skips, saying why, where it is reported missing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import textwrap

import pytest

from tests.support.sandbox import prog, statuses, works_or_fail
from tracerl.rewards.code import CodeTests, Limits, score_code


@pytest.fixture(scope="module")
def caps():
    return works_or_fail()


QUICK = Limits(time_limit=2.0, setup_time=3.0, total_time=30.0)


# --- 1. the file system: an allowlist, not a denylist ---------------------------------------


def skip_without_allowlist_view(result):
    """Skip where the sandbox *reports* that it could not build the view (no mount namespace,
    or the read-only-host fallback); a sandbox that reports nothing is tested."""
    p = result.protections
    if not p.get("mount_namespace") or p.get("filesystem_view") == "host-readonly":
        pytest.skip(f"no allowlist view on this host (reported: mount_namespace="
                    f"{p.get('mount_namespace')}, filesystem_view={p.get('filesystem_view')})")


@pytest.fixture
def planted_data():
    """A scored data file (with the expected answer in it) where the old denylist did not look:
    outside /tmp, the home directories, the working directory and the venv."""
    token = f"EXPECTED-{secrets.token_hex(8)}"
    for parent in ("/opt", "/var/lib", "/usr/local/share", "/srv/data"):
        try:
            os.makedirs(parent, exist_ok=True)
            d = tempfile.mkdtemp(prefix="tracerl-planted-", dir=parent)
        except OSError:
            continue
        os.chmod(d, 0o755)  # as datasets usually are: world-readable
        path = os.path.join(d, "batch.jsonl")
        with open(path, "w") as fh:
            fh.write('{"problem": "add", "answer": "%s", "response": "def add(a, b): ..."}\n'
                     % token)
        yield token, path
        shutil.rmtree(d, ignore_errors=True)
        return
    pytest.skip("no writable directory outside the usual ones to plant a data file in")


def test_scored_data_is_not_visible_anywhere(caps, planted_data):
    token, path = planted_data
    tests = CodeTests("function", asserts=(f"assert answer() == {token!r}",))
    program = prog("""
        import os
        def answer():
            for root, dirs, files in os.walk("/"):
                if root.startswith(("/proc", "/sys")):
                    dirs[:] = []
                    continue
                for name in files:
                    if name.endswith(".jsonl"):
                        try:
                            text = open(os.path.join(root, name), errors="replace").read()
                        except OSError:
                            continue
                        i = text.find("EXPECTED-")
                        if i >= 0:
                            return text[i:i + 25]
            return "not found"
    """)
    r = score_code(program, tests, limits=Limits(time_limit=20.0, total_time=40.0))
    skip_without_allowlist_view(r)
    assert statuses(r) == ["failed"], r.verdicts
    assert "not found" in r.verdicts[0].detail


def test_only_the_allowlist_is_visible(caps):
    program = prog("""
        import os
        def files():
            found = []
            for root, dirs, names in os.walk("/"):
                if root.startswith("/proc"):
                    dirs[:] = []
                    continue
                found += [os.path.join(root, n) for n in names
                          if not os.path.islink(os.path.join(root, n))]
            return sorted(found)
    """)
    allowed = list(caps.get("visible_paths", [])) + ["/tmp", "/dev"]
    tests = CodeTests("function", asserts=(
        "assert len(files()) > 100",  # the standard library is there
        f"assert [f for f in files() if not any(f == a or f.startswith(a + '/') "
        f"for a in {allowed!r})] == []"))
    r = score_code(program, tests, limits=Limits(time_limit=20.0, total_time=60.0))
    skip_without_allowlist_view(r)
    assert statuses(r) == ["passed", "passed"], r.verdicts
    # and none of the places data usually lives
    for d in ("/home", "/root/.cache", "/var", "/opt", "/srv", "/mnt", "/etc/passwd"):
        check = CodeTests("function", asserts=(f"assert exists({d!r}) is False",))
        r3 = score_code("import os\ndef exists(p):\n    return os.path.exists(p)\n", check,
                        limits=QUICK)
        assert statuses(r3) == ["passed"], (d, r3.verdicts)


def test_devices_shm_and_multiprocessing_work(caps):
    program = prog("""
        import os
        def devices():
            with open("/dev/null", "w") as fh:
                fh.write("discarded")
            with open("/dev/zero", "rb") as fh:
                zeros = fh.read(4)
            with open("/dev/urandom", "rb") as fh:
                noise = fh.read(16)
            return zeros, len(noise)
        def shm():
            with open("/dev/shm/scratch", "w") as fh:
                fh.write("x")
            return os.path.getsize("/dev/shm/scratch")
        def pool(xs):
            import multiprocessing
            with multiprocessing.Pool(2) as p:
                return p.map(abs, xs)
    """)
    tests = CodeTests("function", asserts=("assert devices() == (bytes(4), 16)",
                                           "assert shm() == 1",
                                           "assert pool([-1, 2, -3]) == [1, 2, 3]"))
    r = score_code(program, tests, limits=Limits(time_limit=10.0, total_time=40.0))
    assert statuses(r) == ["passed"] * 3, r.verdicts


def test_named_site_packages_are_the_only_ones_visible(caps):
    pytest.importorskip("numpy")
    program = prog("""
        import numpy as np
        def total(n):
            return int(np.arange(n).sum())
        def other():
            try:
                import sympy
                return "imported"
            except ImportError:
                return "missing"
    """)
    tests = CodeTests("function", asserts=("assert total(5) == 10", "assert other() == 'missing'"))
    r = score_code(program, tests, limits=Limits(time_limit=10.0, site_packages=("numpy",)))
    skip_without_allowlist_view(r)
    assert statuses(r) == ["passed", "passed"], r.verdicts
    r = score_code(program, tests, limits=QUICK)  # off by default
    assert r.reward == 0.0 and "numpy" in r.verdicts[0].detail, r.verdicts


def test_packages_below_tmp_are_visible(caps, tmp_path, monkeypatch):
    # CI clones (and their virtual environments) live under /tmp, which the view covers with
    # its own root: the view must still reach what it binds from there.
    name = f"tracerl_pkg_{secrets.token_hex(4)}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("ANSWER = 42\n")
    os.chmod(tmp_path, 0o755)
    monkeypatch.syspath_prepend(str(tmp_path))
    tests = CodeTests("function", asserts=("assert answer() == 42",))
    program = f"def answer():\n    import {name}\n    return {name}.ANSWER\n"
    r = score_code(program, tests, limits=Limits(time_limit=5.0, site_packages=(name,)))
    skip_without_allowlist_view(r)
    assert r.protections["filesystem_view"] == "allowlist", r.protections.get("errors")
    assert statuses(r) == ["passed"], r.verdicts


def test_site_packages_setting_is_checked():
    with pytest.raises(ValueError, match="site_packages"):
        Limits(site_packages="numpy")
    with pytest.raises(ValueError, match="site_packages"):
        Limits(site_packages=("numpy; import os",))
    assert Limits(site_packages=["numpy"]).site_packages == ("numpy",)


# --- 2. the judge: bounded values, its own limits ----------------------------------------------


@pytest.mark.parametrize("returned, test, why", [
    ("range(10**18)", "assert set(f()) == {1, 2}", "elements"),
    ("range(10**18)", "assert sum(f()) == 3", "elements"),
    ("range(10**30)", "assert len(f()) > 0", "elements"),
    ("(i for i in iter(int, 1))", "assert list(f()) == [0]", "elements"),  # endless generator
    ("Fraction(7**60000, 7**59999, _normalize=False)", "assert f() == 7", "bits"),
    ("10**100000", "assert f() % 7 == 3", "bits"),
    ("Decimal('1e999999999')", "assert int(f()) > 0", "exponent"),
    ("[[0] * 2000 for _ in range(2000)]", "assert len(f()) == 2000", "elements"),
    # distinct ints that all hash to 0: a set of them is quadratic, in C
    ("[k * (2**61 - 1) for k in range(1, 50001)]", "assert len(set(f())) == 50000", "hash"),
])
def test_oversized_values_fail_the_test_not_the_judge(caps, returned, test, why):
    program = f"from fractions import Fraction\nfrom decimal import Decimal\n" \
              f"def f():\n    return {returned}\n"
    tests = CodeTests("function", asserts=(test, "assert ok() == 1"))
    r = score_code(program + "def ok():\n    return 1\n", tests, limits=QUICK)
    assert r.error is None, r.error
    assert statuses(r) == ["output_limit", "passed"], r.verdicts
    assert why in r.verdicts[0].detail


def test_values_under_the_bounds_still_cross(caps):
    program = prog("""
        from fractions import Fraction
        def f():
            return (range(10), Fraction(2**100, 3**50), 2**4000, list(range(100000)), iter([1, 2]),
                    [2**64 + k for k in range(5000)] + [2**70] * 5000)
    """)
    tests = CodeTests("function", asserts=(
        "r, q, big, xs, it, bigs = f()\n"
        "assert r == range(10) and q == __import__('fractions').Fraction(2**100, 3**50)\n"
        "assert big == 2**4000 and sum(xs) == 4999950000 and list(it) == [1, 2]\n"
        "assert len(set(bigs)) == 5001",))
    r = score_code(program, tests, limits=QUICK)
    assert statuses(r) == ["passed"], r.verdicts


def test_a_test_that_loops_in_the_judge_times_out(caps):
    program = "def f():\n    return list(range(1000))\n"
    tests = CodeTests("function", asserts=(
        "assert sum(x * y for x in f() for y in range(10**7)) == 0", "assert len(f()) == 1000"))
    r = score_code(program, tests, limits=Limits(time_limit=0.5, setup_time=3.0,
                                                 total_time=30.0))
    assert statuses(r) == ["timeout", "passed"], r.verdicts
    assert "judge" in r.verdicts[0].detail
    assert r.protections["judge_limits"]["as"] == Limits().judge_memory_mb << 20


def test_judge_memory_is_limited(caps):
    program = "def f():\n    return 3 * 10**9\n"
    tests = CodeTests("function", asserts=("assert len('x' * f()) == 1", "assert f() > 0"))
    r = score_code(program, tests, limits=Limits(time_limit=2.0, judge_memory_mb=512))
    assert statuses(r) == ["failed", "passed"], r.verdicts
    assert "MemoryError" in r.verdicts[0].detail


# --- 3. one memory limit for the whole program -------------------------------------------------


MEMORY_HOG = prog("""
    import os, time
    def hold(w, mib):
        # In a forked child: touch mib MiB, report on w, keep it.
        block = bytearray(mib << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        os.write(w, b"+")
        time.sleep(30)
        os._exit(0)
    def children(n, mib):
        r, w = os.pipe()
        for _ in range(n):
            if os.fork() == 0:
                hold(w, mib)
        got = 0
        while got < n:
            got += len(os.read(r, 64))
        return "all held"
    def memfds(n, mib):
        chunk = b"x" * (1 << 20)
        fds = []
        for _ in range(n):
            fd = os.memfd_create("hold")
            for _ in range(mib):
                os.write(fd, chunk)
            fds.append(fd)
        return "all held"
    def small():
        return len(bytearray(50 << 20))
    def one_by_one(n, mib):
        # Each child reports before the next starts, so the kernel's victim (the largest
        # process) is a child that already reported, and the call still answers.
        r, w = os.pipe()
        for _ in range(n):
            if os.fork() == 0:
                hold(w, mib)
            os.read(r, 1)
        return "all held"
""")


def test_memory_limit_binds_across_processes_and_memfds(caps):
    tests = CodeTests("function", asserts=("assert children(4, 400) == 'all held'",
                                           "assert memfds(100, 15) == 'all held'",
                                           "assert small() == 50 << 20"))
    r = score_code(MEMORY_HOG, tests, limits=Limits(time_limit=20.0, total_time=60.0,
                                                    memory_mb=1024))
    p = r.protections
    if p.get("memory_scope") == "per-process":
        pytest.skip(f"no memory cgroup on this host (memory_scope={p.get('memory_scope')}, "
                    f"reported; errors: {p.get('errors')})")
    assert statuses(r) == ["memory", "memory", "passed"], r.verdicts


def test_memory_limit_binds_when_the_killed_process_had_already_answered(caps):
    """Three children of 400 MiB one after the other under 1024 MiB: the kernel kills one that
    already reported, the third completes and the call answers 'all held'; the processes still
    went over the limit, so the verdict is memory, not passed."""
    tests = CodeTests("function", asserts=("assert one_by_one(3, 400) == 'all held'",
                                           "assert small() == 50 << 20"))
    r = score_code(MEMORY_HOG, tests, limits=Limits(time_limit=20.0, total_time=60.0,
                                                    memory_mb=1024))
    if r.protections.get("memory_scope") == "per-process":
        pytest.skip(f"no memory cgroup on this host (errors: {r.protections.get('errors')})")
    assert statuses(r) == ["memory", "passed"], r.verdicts


def test_memory_cgroups_are_removed_after_use(caps):
    from tracerl.sandbox.cgroups import _own_dirs

    if caps.get("memory_scope") != "all-processes":
        pytest.skip("no memory cgroup on this host (reported)")
    tests = CodeTests("function", asserts=("assert small() == 50 << 20",))
    assert score_code(MEMORY_HOG, tests, limits=QUICK).reward == 1.0
    left = [name for _, parent in _own_dirs() for name in os.listdir(parent)
            if name.startswith("tracerl-sandbox-")]
    assert left == []


def test_memory_limit_is_reported(caps):
    assert caps["memory_scope"] in ("all-processes", "per-process")
    assert caps["memory_cgroup"] in ("v1", "v2", False)
    assert (caps["memory_cgroup"] is False) == (caps["memory_scope"] == "per-process")


# --- 4. honest programs behave as under plain Python -------------------------------------------


def test_prints_in_test_lines_do_not_break_the_result(caps):
    program = "def f(x):\n    print('inside', x)\n    return x + 1\n"
    tests = CodeTests("function", asserts=("print('checking'); assert f(1) == 2",
                                           "import sys; sys.stdout.write('x' * 100000); "
                                           "assert f(2) == 3",
                                           "print(f(3), file=__import__('sys').stderr); "
                                           "assert f(3) == 4"))
    r = score_code(program, tests, limits=QUICK)
    assert statuses(r) == ["passed"] * 3, (r.verdicts, r.error)


def test_exceptions_keep_their_builtin_bases(caps):
    program = prog("""
        class ParseError(ValueError):
            pass
        class Missing(KeyError):
            pass
        def parse(s):
            if not s.isdigit():
                raise ParseError(f"not a number: {s}")
            return int(s)
        def lookup(k):
            raise Missing(k)
        def decode(b):
            return b.decode("ascii")
    """)
    check = prog("""
        def check(candidate):
            assert candidate("12") == 12
            try:
                candidate("x")
                assert False, "no error"
            except ValueError as exc:
                assert "not a number" in str(exc)
            try:
                lookup("k")
                assert False
            except LookupError:
                pass
            try:
                decode(b"\\xff")
                assert False
            except ValueError:
                pass
    """)
    tests = CodeTests.from_humaneval({"prompt": "", "test": check, "entry_point": "parse"})
    r = score_code(program, tests, limits=QUICK)
    assert statuses(r) == ["passed"] * 4, r.verdicts


def test_stop_iteration_from_the_program_cannot_end_a_test_early(caps):
    program = prog("""
        def is_even(n):
            raise StopIteration
    """)
    tests = CodeTests("function", asserts=("assert all(map(lambda n: is_even(n) is (n % 2 == 0), "
                                           "range(10)))",
                                           "assert all(is_even(n) for n in [2, 4])"))
    r = score_code(program, tests, limits=QUICK)
    assert r.reward == 0.0, r.verdicts
    assert all("StopIteration" in v.detail for v in r.verdicts), r.verdicts


# --- an unprivileged caller ------------------------------------------------------------------


def test_an_unprivileged_caller_gets_namespaces_and_the_view():
    """Run as root, drop to ``nobody`` (setpriv) and score there: the user-namespace path (the
    judge is non-dumpable, so its fork must become dumpable to write its id maps)."""
    import subprocess
    import sys

    from tracerl.sandbox.isolation import _path_world_accessible

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the sandbox as an unprivileged user")
    if not _path_world_accessible(os.path.realpath(sys.executable)) or not _path_world_accessible(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
        pytest.skip("the interpreter or the source tree is not readable by an unprivileged user here")
    folder = tempfile.mkdtemp(prefix="tracerl-unprivileged-")  # pytest's tmp_path is root's only
    os.chmod(folder, 0o755)
    script = os.path.join(folder, "probe.py")
    with open(script, "w") as fh:
        fh.write(textwrap.dedent("""
        import json
        from tracerl.rewards.code import CodeTests, Limits, score_code
        r = score_code("def f():\\n    return 1\\n", CodeTests("function", asserts=("assert f() == 1",)),
                       limits=Limits(time_limit=5.0))
        print(json.dumps({"reward": r.reward, "error": r.error, "p": r.protections}))
    """))
    try:
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              sys.executable, script], capture_output=True, text=True, timeout=120,
                             env={"HOME": "/tmp", "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "unshare (user)" in " ".join(result["p"].get("errors", [])):
        pytest.skip(f"unprivileged user namespaces are refused here: {result['p']['errors']}")
    assert result["reward"] == 1.0 and result["error"] is None, result
    assert result["p"]["namespace_mode"] == "user" and result["p"]["filesystem_view"] == "allowlist"
