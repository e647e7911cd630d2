"""Hub ids (tracerl/models/hub.py) against a real Hugging Face cache layout on disk, offline
(``HF_HUB_OFFLINE=1``): ``models--org--name/{refs/main, snapshots/<commit>/...}`` as
huggingface_hub writes it, read by load_model, ``tracerl info`` and ``tracerl serve``'s loader."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tracerl.errors import CheckpointError
from tracerl.models import load_model
from tracerl.models.hub import looks_like_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """A cache holding ``tracerl-test/tiny`` at COMMIT (refs/main points to it)."""
    repo = tmp_path / "hf" / "hub" / "models--tracerl-test--tiny"
    load_model("tiny-block").save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def test_a_cached_hub_id_loads_offline(hf_home):
    want = load_model("tiny-block")
    for name in ("tracerl-test/tiny", f"tracerl-test/tiny@{COMMIT}"):
        got = load_model(name)
        assert got.family == "block" and got.block_size == want.block_size
        for (k, a), (_, b) in zip(got.backbone.state_dict().items(), want.backbone.state_dict().items()):
            assert torch.equal(a, b), k


def test_tracerl_info_takes_a_hub_id(hf_home):
    out = subprocess.run([sys.executable, "-m", "tracerl", "info", "tracerl-test/tiny", "--json"],
                         capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert '"family": "block"' in out.stdout


def test_an_uncached_id_offline_is_one_clear_line(hf_home):
    with pytest.raises(CheckpointError) as e:
        load_model("tracerl-test/missing")
    message = str(e.value)
    assert "\n" not in message and "tracerl-test/missing" in message
    assert "HF_HUB_OFFLINE=1" in message and str(hf_home / "hub") in message and "hf download" in message
    with pytest.raises(CheckpointError, match="revision nope"):
        load_model("tracerl-test/tiny@nope")
    out = subprocess.run([sys.executable, "-m", "tracerl", "info", "tracerl-test/missing"],
                         capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_hub_id("JetLM/SDAR-1.7B-Chat") and looks_like_hub_id("org/name@v1.0")
    assert not looks_like_hub_id("tiny-block") and not looks_like_hub_id("/abs/path")
    assert not looks_like_hub_id("runs/sft/checkpoints/step-1") and not looks_like_hub_id("../x")
    (tmp_path / "local" / "folder").mkdir(parents=True)
    assert not looks_like_hub_id("local/folder")  # an existing path is a path
