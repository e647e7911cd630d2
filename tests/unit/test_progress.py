"""Progress reporting (tracerl/progress.py): plain lines off a terminal and under --json, a rich
bar on a real pseudo-terminal, rate/ETA from this process's items only, figures shown."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
from tests.support import REPO

from tracerl.errors import ConfigError
from tracerl.progress import ProgressReporter, format_duration, progress_mode


def test_lines_mode_prints_about_twenty_lines_with_rate_eta_and_figures():
    out = io.StringIO()
    with ProgressReporter("sft", 40, unit="step", progress="lines", stream=out) as bar:
        for step in range(1, 41):
            time.sleep(0.001)
            bar.update(step, loss=1.0 / step)
    lines = out.getvalue().splitlines()
    assert lines == bar.lines and len(lines) == 20  # every 2 steps
    assert lines[0].startswith("sft 2/40 step (5%)") and "step/s" in lines[0] and "eta " in lines[0]
    assert "loss 0.500" in lines[0]
    assert lines[-1].startswith("sft 40/40 step (100%)") and "eta" not in lines[-1] and "loss 0.025" in lines[-1]


def test_rate_counts_only_this_process_and_eta_follows():
    bar = ProgressReporter("rl", 100, unit="step", completed=90, progress="off")
    assert bar.rate() is None and bar.eta() is None  # nothing done yet: no made-up figures
    bar._t0 -= 2.0  # two seconds ago, as if it had run since then
    bar.update(94)
    assert bar.rate() == pytest.approx(4 / 2.0, rel=1e-2)  # 4 steps in 2 s, not 94
    assert bar.eta() == pytest.approx(6 / 4 * 2.0, rel=1e-2)  # 6 left at 2 steps/s


def test_a_run_that_stops_early_and_final_figures_get_a_last_line():
    out = io.StringIO()
    with ProgressReporter("sft", 400, unit="step", progress="lines", stream=out) as bar:
        bar.update(30)
        bar.update(accuracy=0.25)
    assert out.getvalue().splitlines()[-1].startswith("sft 30/400 step (8%)")
    assert "accuracy 0.250" in out.getvalue().splitlines()[-1]


def test_modes():
    assert progress_mode(False) == "off" and progress_mode("lines") == "lines"
    assert progress_mode(True, io.StringIO()) == "lines"  # not a terminal
    with pytest.raises(ConfigError, match="progress: 'loud'; valid: auto, bar, lines, off"):
        progress_mode("loud")
    assert format_duration(3725) == "1:02:05" and format_duration(65.4) == "1:05"
    out = io.StringIO()
    with ProgressReporter("x", 3, progress="off", stream=out) as bar:
        bar.update(3, loss=1.0)
    assert out.getvalue() == ""


SFT = ["sft", "configs/sft-tiny.yaml", "max_steps=6", "save_every=0", "eval.every=3", "loop.report_to=[none]"]


def test_json_mode_keeps_stdout_clean_and_prints_progress_lines(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tracerl", *SFT, f"output_dir={tmp_path / 'run'}", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 6
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sft ")]
    assert len(lines) == 6 and lines[-1].startswith("sft 6/6 step (100%)")
    assert all(re.search(r"loss \d+\.\d{3}", line) for line in lines)
    assert "tok/s" in lines[0] and "val_acc" in lines[2] and "eta" in lines[2]  # evaluated at step 3


def test_a_terminal_gets_the_rich_bar(tmp_path):
    """stderr on a real pseudo-terminal: the bar (redrawn with carriage returns / cursor moves)."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "tracerl", *SFT, f"output_dir={tmp_path / 'run'}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=secondary, stdin=subprocess.DEVNULL,
                            env={**os.environ, "COLUMNS": "160", "TERM": "xterm"})
    os.close(secondary)
    chunks, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 1.0)
        if ready:
            try:
                data = os.read(primary, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(primary)
    assert proc.wait(timeout=60) == 0
    screen = b"".join(chunks).decode("utf-8", "replace")
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    assert "\x1b[" in screen and "━" in plain  # drawn as a bar, not as plain lines
    assert "6/6" in plain and "loss" in plain and "step/s" in plain
    assert not re.search(r"^sft \d+/6 step \(", plain, re.M)  # no lines-mode output on a terminal
