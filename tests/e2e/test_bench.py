"""The benchmarks run end to end and report consistent figures (no speed asserts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_generate_quick_json():
    out = subprocess.run([sys.executable, "-m", "tracerl.cli", "bench", "generate", "--quick", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("tokens_per_s", "nfe_per_token", "forward_fraction", "cache_speedup"):
        assert isinstance(data[key], float) and data[key] > 0, key
    assert 0 < data["forward_fraction"] <= 1
    assert data["nfe_per_token"] == pytest.approx(1.0)  # static, one token per step
    runs = data["runs"]
    assert set(runs) == {"batch1_cache", "batch1_nocache", "batch4_cache", "batch4_nocache"}
    assert all(r["new_tokens"] == r["forwards"] * (4 if "batch4" in name else 1) for name, r in runs.items())
    assert data["cache_speedup"] == pytest.approx(runs["batch4_nocache"]["seconds"] / runs["batch4_cache"]["seconds"])
    assert "tokens/s" in out.stderr  # the table goes to stderr under --json


@pytest.mark.slow
def test_bench_engine_quick_json():
    out = subprocess.run([sys.executable, "-m", "tracerl.cli", "bench", "engine", "--quick", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("speedup_vs_static", "tokens_per_s", "forward_fraction", "slot_occupancy"):
        assert isinstance(data[key], float) and data[key] > 0, key
    assert 0 < data["forward_fraction"] <= 1 and 0 < data["slot_occupancy"] <= 1
    assert data["identical"] is True and data["identical_requests"] == data["requests"] == 24
    assert data["speedup_vs_static"] == pytest.approx(data["static_seconds"] / data["engine_seconds"])
    lengths = data["response_tokens"]
    assert 1 <= lengths["min"] < lengths["max"] <= data["max_new_tokens"]  # stop tokens spread the lengths
    assert data["kv_bytes_per_token"] == 4 * 2 * 2 * 32 * 4  # layers * (k, v) * kv heads * head dim * fp32
    assert "speedup_vs_static" in out.stderr


def test_engine_gpu_script_runs_on_cpu_with_a_tiny_shape():
    """benchmarks/engine_gpu.py (the SDAR-4B-shaped GPU figure) cannot rot unnoticed on CPU CI."""
    script = str(Path(__file__).resolve().parents[2] / "benchmarks" / "engine_gpu.py")
    out = subprocess.run([sys.executable, script, "--tiny", "--device", "cpu", "--batch", "4",
                          "--prompt", "9", "--new", "8", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["shape"] == "tiny" and data["batch"] == 4 and data["new_tokens"] == 8
    assert data["engine_tokens_per_s"] > 0 and data["static_tokens_per_s"] > 0
    assert data["identical"] is True  # float32 on CPU: the engine equals generate()
    import torch

    if not torch.cuda.is_available():  # the default device is CUDA: a clear one-line refusal here
        missing = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
        assert missing.returncode == 2 and "no CUDA device" in missing.stderr


@pytest.mark.slow
def test_serve_load_script_runs_with_zero_errors():
    """benchmarks/serve_load.py (the serving issue's load figure), shortened: a real server
    subprocess, concurrent answers equal to the sequential ones."""
    script = str(Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py")
    out = subprocess.run([sys.executable, script, "--requests", "12", "--concurrency", "4", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = json.loads(out.stdout.strip().splitlines()[-1])["runs"]
    assert [r["concurrency"] for r in runs] == [1, 4]
    for r in runs:
        assert r["requests"] == 12 and r["errors"] == 0 and r["mismatched"] == 0
        assert 0 < r["p50_s"] <= r["p99_s"] and r["tokens_per_s"] > 0
    assert runs[1]["throughput_ratio"] == pytest.approx(runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"])


def test_train_gpu_script_runs_on_cpu_with_a_tiny_shape():
    """benchmarks/train_gpu.py (sdpa vs FlexAttention training step, the GPU figure) runs its flex
    forward on CPU with the same first loss as dense SDPA, a full sdpa step, and refuses a flex
    backward on CPU in one line."""
    script = str(Path(__file__).resolve().parents[2] / "benchmarks" / "train_gpu.py")
    base = [sys.executable, script, "--tiny", "--device", "cpu", "--prompt", "9", "--response", "14", "--json"]
    forward = subprocess.run(base + ["--forward-only"], capture_output=True, text=True, timeout=300)
    assert forward.returncode == 0, forward.stderr
    data = json.loads(forward.stdout.strip().splitlines()[-1])
    sdpa, flex = data["runs"]
    assert data["fsdp2"] is True  # sharded with FSDP2 over a one-process group, as each rank of a run
    assert (sdpa["attention"], flex["attention"]) == ("sdpa", "flex") and flex["tokens_per_s"] > 0
    assert abs(sdpa["first_loss"] - flex["first_loss"]) < 1e-5 * abs(sdpa["first_loss"])
    step = subprocess.run(base + ["--attention", "sdpa", "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert step.returncode == 0, step.stderr
    assert json.loads(step.stdout.strip().splitlines()[-1])["runs"][0]["tokens_per_s"] > 0
    refused = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "no backward pass on CPU" in refused.stderr
