"""`tracerl eval` and `tracerl score` end to end (real subprocesses, tiny preset, embedded task)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import REPO

CONFIGS = REPO / "configs"


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "tracerl.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def last_json(out):
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_eval_tiny_end_to_end(tmp_path):
    out = cli("eval", str(CONFIGS / "eval-tiny.yaml"), f"output_dir={tmp_path}", "task.size=6", "n=2",
              "sampling.temperature=1.0", "sampling.seed=3", "--json")
    summary = last_json(out)
    for key in ("accuracy", "pass@1", "pass@2", "mean_response_length", "nfe_per_token", "tokens_per_s"):
        assert key in summary
    assert summary["problems"] == 6 and summary["samples"] == 12
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12
    for s in samples:
        assert len(s["step_map"]) == len(s["token_ids"]) <= 8 and s["reward"] in (0.0, 1.0)
    assert json.loads((tmp_path / "summary.json").read_text())["accuracy"] == summary["accuracy"]
    assert summary["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / 12)
    assert "eval" in out.stderr  # progress bar on stderr


def test_eval_bad_override_is_one_line():
    out = cli("eval", str(CONFIGS / "eval-tiny.yaml"), "sampling.strategy=fastest")
    assert out.returncode == 2 and "strategy" in out.stderr and out.stdout == ""


def test_score_math_keeps_every_row_in_order(tmp_path):
    rows = [
        {"id": 1, "response": "so \\boxed{\\frac{1}{2}}", "ground_truth_answer": "0.5"},
        {"id": 2, "response": "The answer is 12", "ground_truth_answer": "(1,2)"},
        {"id": 3, "response": "no answer", "ground_truth_answer": 7},
        {"id": 4, "response": 42, "ground_truth_answer": "42"},  # wrong type: an error row
        {"id": 5, "response": "\\boxed{3}", "ground_truth_answer": "3"},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = cli("score", "--task", "math", "--input", str(src), "--output", str(tmp_path / "out.jsonl"), "--json")
    assert out.returncode == 2 and "in.jsonl:4" in out.stderr and "'response'" in out.stderr
    assert not (tmp_path / "out.jsonl").exists()

    summary = last_json(cli("score", "--task", "math", "--input", str(src), "--output", str(tmp_path / "out.jsonl"),
                            "--skip-bad-rows", "--json"))
    scored = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in scored] == [1, 2, 3, 4, 5]
    assert [r["correct"] for r in scored] == [True, False, False, None, True]
    assert scored[0]["extracted_answer"] == "\\frac{1}{2}" and "error" in scored[3]
    assert summary["scored"] == 4 and summary["skipped"] == 1 and summary["accuracy"] == 0.5


def test_score_code_rows(tmp_path):
    tests = {"test_method": "function", "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}
    rows = [
        {"id": "ok", "response": "```python\ndef add(a, b):\n    return a + b\n```", **tests},
        {"id": "half", "response": "```python\ndef add(a, b):\n    return 3\n```", **tests},
        {"id": "cheat", "response": "```python\nimport sys\ndef add(a, b):\n    sys.exit(0)\n```", **tests},
        {"id": "stdio", "response": "```python\nprint(int(input()) * 2)\n```", "test_method": "stdio",
         "test_input": ["2\n", "5\n"], "test_output": ["4\n", "10   \n\n"]},
    ]
    src = tmp_path / "code.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = last_json(cli("score", "--task", "code", "--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                            "--json"))
    scored = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["id"] for r in scored] == ["ok", "half", "cheat", "stdio"]
    assert [r["reward"] for r in scored] == [1.0, 0.5, 0.0, 1.0]
    assert [r["correct"] for r in scored] == [True, False, False, True]
    assert scored[1]["verdicts"] == ["passed", "failed"]
    assert summary["accuracy"] == 0.5


def test_score_reads_tracerl_eval_samples_and_reports_no_accuracy_when_nothing_scored(tmp_path):
    # tracerl eval's sample rows carry the gold answer in "answer": no flag needed.
    samples = [{"problem_id": "p1", "sample": 0, "question": "1+1", "answer": "2", "response": "\\boxed{2}"},
               {"problem_id": "p2", "sample": 0, "question": "2+2", "answer": "4", "response": "5"}]
    src = tmp_path / "samples.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in samples))
    summary = last_json(cli("score", "--task", "math", "--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                            "--json"))
    assert summary["scored"] == 2 and summary["accuracy"] == 0.5
    # A row without any gold answer field: the error names the flag that maps one.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"response": "2", "gold": "2"}) + "\n")
    out = cli("score", "--task", "math", "--input", str(bad), "--output", str(tmp_path / "b.jsonl"))
    assert out.returncode == 2 and "bad.jsonl:1" in out.stderr and "--answer-field" in out.stderr
    # Every row skipped: accuracy is null, not 0.
    summary = last_json(cli("score", "--task", "math", "--input", str(bad), "--output", str(tmp_path / "b.jsonl"),
                            "--skip-bad-rows", "--json"))
    assert summary["scored"] == 0 and summary["accuracy"] is None and summary["mean_reward"] is None
    mapped = last_json(cli("score", "--task", "math", "--input", str(bad), "--output", str(tmp_path / "m.jsonl"),
                           "--answer-field", "gold", "--json"))
    assert mapped["accuracy"] == 1.0
