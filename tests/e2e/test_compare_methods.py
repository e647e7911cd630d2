"""benchmarks/compare_methods.py in a real subprocess: recipe overrides (--set) reach every run and
are recorded; a bad key fails before any run starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

SCRIPT = REPO / "benchmarks" / "compare_methods.py"


def _compare(out: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--start", "tiny-block", "--out", str(out), "--steps", "1",
           "--eval-every", "1", "--seeds", "0", "--methods", "coupled", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_overrides_reach_every_run_and_are_recorded(tmp_path):
    out = tmp_path / "cmp"
    proc = _compare(out, "--set", "rl.rollout.num_prompts=3", "rl.rollout.group_size=2", "rl.optim.lr=2e-5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["overrides"] == ["rl.rollout.num_prompts=3", "rl.rollout.group_size=2", "rl.optim.lr=2e-5"]
    run_config = json.loads((out / "coupled-seed0" / "config.json").read_text())
    assert run_config["rollout"]["num_prompts"] == 3 and run_config["rollout"]["group_size"] == 2
    assert run_config["optim"]["lr"] == 2e-5
    assert run_config["policy"]["method"] == "coupled" and run_config["max_steps"] == 1  # script's own keys
    assert [r["seed"] for r in results["runs"].values()] == [0]
    assert "| coupled |" in (out / "results.md").read_text()


def test_a_bad_override_fails_before_any_run(tmp_path):
    out = tmp_path / "bad"
    proc = _compare(out, "--set", "rl.optim.lrr=1e-4", timeout=120)
    assert proc.returncode != 0 and "lrr" in proc.stderr
    assert not (out / "results.json").exists() and not any(out.glob("*-seed*"))
