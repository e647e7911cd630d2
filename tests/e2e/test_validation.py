"""Validation before work: a bad device, data file or task is a one-line error that names the
key, raised before any weights load (the model path given here does not even exist)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tracerl.devices import available_devices, check_device
from tracerl.errors import ConfigError

MISSING_MODEL = "/nonexistent/model-that-would-take-minutes-to-load"


def test_check_device_names_the_key_and_what_is_available():
    assert check_device("cpu") == torch.device("cpu")
    assert "cpu" in available_devices()
    with pytest.raises(ConfigError, match=r"^device: 'gpu' is not a device name; valid: cpu, cuda"):
        check_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^eval\.device: 'cuda:1' is not available on this machine .*available: cpu"):
            check_device("cuda:1", key="eval.device")


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tracerl.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@pytest.mark.parametrize("command,args,words", [
    ("sft", [f"model={MISSING_MODEL}", "data.file=missing.jsonl"], ["missing.jsonl", "no such file"]),
    ("sft", [f"model={MISSING_MODEL}", "device=cuda:7"], ["device", "cuda:7", "available: cpu"]),
    ("rl", [f"model={MISSING_MODEL}", "task.source=jsonl", "task.name=nowhere.jsonl"], ["nowhere.jsonl"]),
    ("rl", [f"model={MISSING_MODEL}", "policy.method=grpo"], ["policy.method", "grpo", "tracerl"]),
    ("eval", [f"model={MISSING_MODEL}", "task.source=jsonl", "task.name=nowhere.jsonl"], ["nowhere.jsonl"]),
])
def test_bad_input_fails_before_the_model_loads(tmp_path, command, args, words):
    if "cuda:7" in args[-1] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    done = _cli(command, *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tracerl {command}: error: "), done.stderr
    assert MISSING_MODEL not in lines[0]  # the model was never touched
    for w in words:
        assert w in lines[0]
