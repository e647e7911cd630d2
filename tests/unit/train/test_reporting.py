"""loop.report_to: TensorBoard event files read back with TensorBoard's own reader, a W&B run in
offline mode writing its run folder (and a resume continuing the same run), and the up-front
errors: an unknown tracker, a tracker whose package is missing, W&B online with no login."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tests.support import REPO

from tracerl.errors import ConfigError
from tracerl.recipes.sft import run_sft
from tracerl.train.loop import LoopConfig
from tracerl.train.metrics import check_report_to, read_metrics, wandb_login_problem

from tests.unit.train.test_train import base_config, make


def test_tensorboard_events_hold_every_metrics_row(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run_sft(make(base_config(out, max_steps=3, save_every=0, loop={"report_to": ["tensorboard"]})), progress=False)
    rows = read_metrics(out / "metrics.jsonl")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "grad_norm"} <= set(events.Tags()["scalars"])
    for key in ("loss", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in logged] == [r["step"] for r in rows] == [1, 2, 3]
        assert [v for _, v in logged] == pytest.approx([r[key] for r in rows], rel=1e-6)  # float32 in the file


def test_report_to_none_writes_metrics_jsonl_only(tmp_path):
    out = tmp_path / "run"
    run_sft(make(base_config(out, max_steps=1, save_every=0, loop={"report_to": ["none"]})), progress=False)
    assert len(read_metrics(out / "metrics.jsonl")) == 1
    assert not (out / "tensorboard").exists() and not (out / "wandb").exists()


@pytest.mark.slow
def test_wandb_offline_writes_its_run_folder_and_a_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = base_config(out, max_steps=2, save_every=2, loop={"report_to": ["wandb"]})
    run_sft(make(cfg), progress=False)
    run_id = (out / "wandb_run_id").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(f"-{run_id}")
    record = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    assert b"loss" in record and b"grad_norm" in record  # the metric rows, protobuf-encoded
    # Resumed to 3 steps: the same W&B run id (a second local segment to sync into it).
    run_sft(make({**cfg, "max_steps": 3}, "resume=true"), progress=False)
    assert (out / "wandb_run_id").read_text().strip() == run_id
    # Every segment is the same run: its record file carries the run id.  (Segments started within
    # the same second get W&B's "-1" suffix on the folder name, so the name alone does not say.)
    segments = sorted((out / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all((p / f"run-{run_id}.wandb").is_file() for p in segments)


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match=r"loop.report_to: unknown tracker 'mlflow'; valid: tensorboard, wandb"):
        LoopConfig(report_to=["mlflow"])
    with pytest.raises(ConfigError, match="'none' cannot be combined"):
        LoopConfig(report_to=["none", "wandb"])
    assert LoopConfig(report_to="none").report_to == [] and check_report_to("tensorboard") == ["tensorboard"]


def test_wandb_online_without_login_is_refused_at_start(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no login here
    assert "not logged in to api.wandb.ai" in wandb_login_problem()
    with pytest.raises(ConfigError, match=r"loop.report_to: wandb: not logged in .*WANDB_MODE=offline"):
        LoopConfig(report_to=["wandb"])
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "x" * 40 + "\n")
    assert wandb_login_problem() is None  # what `wandb login` writes
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_login_problem() is None


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_a_missing_tracker_package_is_one_line_before_the_model_loads(tmp_path, tracker):
    """A real CLI process in which the package cannot be imported (``sys.modules[name] = None``,
    Python's documented import block): exit 2, one line naming the key and the install command,
    and nothing written."""
    out = tmp_path / "run"
    code = (f"import sys; sys.modules[{tracker!r}] = None; from tracerl.cli import main; "
            f"sys.exit(main(['sft', 'configs/sft-tiny.yaml', 'output_dir={out}', 'loop.report_to=[{tracker}]']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"loop.report_to: {tracker} is not installed" in lines[0], proc.stderr
    assert "pip install" in lines[0] and not out.exists()
