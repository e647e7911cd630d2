"""Checkpoints that fail: a full disk while saving (a real tiny tmpfs), a truncated newest
checkpoint on resume (the run falls back to the newest complete one, says so, and ends exactly
where an uninterrupted run ends), and a resume at the final step (the summary keeps its eval
figures)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.disks import mounted_tmpfs
from tests.unit.train.test_train import base_config, gym_task, make
from tracerl.errors import CheckpointError, OutputError
from tracerl.models import load_model
from tracerl.recipes.sft import run_sft
from tracerl.train import checkpoint as ckpt
from tracerl.train.loop import LoopConfig, TrainingRun
from tracerl.train.metrics import read_metrics
from tracerl.train.optim import OptimConfig

STEP2, STEP4 = "step-00000002", "step-00000004"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 4-step SFT run with checkpoints at steps 2 and 4 and an evaluation every 2 steps."""
    root = tmp_path_factory.mktemp("finished")
    cfg = base_config(root / "run", max_steps=4, save_every=2, loop={"micro_batch": 8, "report_to": ["none"]},
                      eval={"every": 2, "task": gym_task("eval", 4), "sampling": {"max_new_tokens": 4}})
    summary = run_sft(make(cfg), progress=False)
    return {"root": root, "cfg": cfg, "summary": summary}


def copy_of(finished, tmp_path) -> tuple[Path, dict]:
    out = tmp_path / "copy"
    shutil.copytree(finished["root"] / "run", out)
    return out, {**finished["cfg"], "output_dir": str(out)}


@pytest.mark.parametrize("victim,damage,reason", [
    ("trainer_state.pt", truncate, "trainer_state.pt has "),
    ("model.safetensors", truncate, "model.safetensors has "),
    ("config.json", truncate, "config.json has "),
    ("trainer_state.pt", Path.unlink, "trainer_state.pt is missing"),
])
def test_resume_falls_back_to_the_newest_complete_checkpoint(finished, tmp_path, victim, damage, reason, caplog):
    out, cfg = copy_of(finished, tmp_path)
    damage(ckpt.checkpoints_dir(out) / STEP4 / victim)
    with caplog.at_level(logging.WARNING, logger="tracerl"):
        resumed = run_sft(make(cfg, "resume=true"), progress=False)
    (warning,) = [r.getMessage() for r in caplog.records if r.name.startswith("tracerl")]
    assert f"checkpoint {STEP4} is incomplete ({reason}" in warning and f"continuing from {STEP2}" in warning
    assert f"kept as {STEP4}.incomplete" in warning
    # Steps 3-4 were trained again, to exactly the weights and rows of the run that was not cut short.
    assert resumed["steps"] == 4 and same_weights(Path(resumed["final_checkpoint"]),
                                                  ckpt.checkpoints_dir(finished["root"] / "run") / STEP4)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (ckpt.checkpoints_dir(out) / f"{STEP4}.incomplete" / "model.safetensors").is_file()  # kept to look at
    assert [p.name for p in ckpt.list_checkpoints(out)] == [STEP2, STEP4]


def test_a_checkpoint_without_a_manifest_is_still_checked_by_reading_it(finished, tmp_path, caplog):
    """Checkpoints written before manifests: a cut safetensors file does not read, so it is skipped."""
    out, cfg = copy_of(finished, tmp_path)
    for step in (STEP2, STEP4):
        (ckpt.checkpoints_dir(out) / step / ckpt.MANIFEST).unlink()
    truncate(ckpt.checkpoints_dir(out) / STEP4 / "model.safetensors")
    assert "model.safetensors does not read" in ckpt.checkpoint_problem(ckpt.checkpoints_dir(out) / STEP4)
    assert ckpt.checkpoint_problem(ckpt.checkpoints_dir(out) / STEP2) is None
    with caplog.at_level(logging.WARNING, logger="tracerl"):
        assert run_sft(make(cfg, "resume=true"), progress=False)["steps"] == 4
    assert any(f"continuing from {STEP2}" in r.getMessage() for r in caplog.records)


def test_resume_with_no_complete_checkpoint_is_an_error_naming_each(finished, tmp_path):
    out, cfg = copy_of(finished, tmp_path)
    for step in (STEP2, STEP4):
        truncate(ckpt.checkpoints_dir(out) / step / "trainer_state.pt")
    with pytest.raises(CheckpointError, match=rf"resume: no complete checkpoint in .*{STEP4}: trainer_state.pt has "
                                              rf".*{STEP2}: trainer_state.pt has"):
        run_sft(make(cfg, "resume=true"), progress=False)
    assert [p.name for p in ckpt.list_checkpoints(out)] == [STEP2, STEP4]  # nothing renamed or removed


def test_resume_at_the_final_step_keeps_the_summary_whole(finished, tmp_path):
    out, cfg = copy_of(finished, tmp_path)
    before = json.loads((out / "summary.json").read_text())
    assert "eval_accuracy" in before
    metrics = (out / "metrics.jsonl").read_text()
    again = run_sft(make(cfg, "resume=true"), progress=False)
    assert again == json.loads((out / "summary.json").read_text())
    moved = {"output_dir": str(out), "final_checkpoint": str(ckpt.checkpoints_dir(out) / STEP4)}  # the copy's
    assert again == {**before, **moved}
    assert (out / "metrics.jsonl").read_text() == metrics  # no step was run again


def test_a_run_stopped_at_its_target_accuracy_stays_stopped_on_resume(finished, tmp_path):
    cfg = finished["cfg"]
    stop = {**cfg, "output_dir": str(tmp_path / "stopped"), "max_steps": 8,
            "eval": {**cfg["eval"], "stop_at": 0.0}}  # any accuracy reaches it: the run stops at its first eval
    first = run_sft(make(stop), progress=False)
    assert first["steps"] == 2 and first["stopped_at_accuracy"]
    assert run_sft(make(stop, "resume=true"), progress=False) == first


# -- a full disk while saving ---------------------------------------------------------------------


def test_a_full_disk_while_saving_is_one_error_and_keeps_the_last_checkpoint(tmp_path):
    model = load_model("tiny-block")
    # Room for one checkpoint (3.3 MB of weights; no optimizer state yet), not for two.
    with mounted_tmpfs(tmp_path / "disk", size="5m") as disk:
        run = TrainingRun(model, output_dir=disk / "run", max_steps=4, save_every=1, seed=0, optim=OptimConfig(),
                          loop=LoopConfig(report_to=["none"]))
        run.start_fresh()
        run.step = 1
        first = run.save({})
        run.step = 2
        with pytest.raises(OutputError) as err:
            run.save({})
        message = str(err.value)
        assert message.startswith(f"{ckpt.checkpoints_dir(disk / 'run') / STEP2}: cannot write the checkpoint "
                                  "(No space left on device)")
        assert message.endswith(f"last good checkpoint: {first}") and "\n" not in message
        assert [p.name for p in ckpt.checkpoints_dir(disk / "run").iterdir()] == ["step-00000001"]  # no temp left
        assert ckpt.checkpoint_problem(first) is None
        run.close()


# -- RL: the value model's folder is part of the checkpoint ---------------------------------------


def test_rl_resume_skips_a_step_whose_value_model_is_cut_and_keeps_the_summary(tmp_path, caplog):
    from tests.unit.rl.test_loop import SMALL, TASK
    from tracerl.config import load_config
    from tracerl.recipes.rl import run_rl
    from tracerl.rl import RLConfig

    base = TASK + SMALL + ["save_every=1", "value.enabled=true", "policy.filter_equal=false", "eval.every=2",
                           "eval.task.size=4", "eval.task.template=raw", "eval.task.chat=false",
                           "eval.sampling.max_new_tokens=4"]
    straight = run_rl(load_config(RLConfig, None, base + [f"output_dir={tmp_path / 'a'}"]), progress=False)
    assert "eval_accuracy" in straight
    # A resume at the last step redoes nothing and keeps the eval figures.
    assert run_rl(load_config(RLConfig, None, base + [f"output_dir={tmp_path / 'a'}", "resume=true"]),
                  progress=False) == straight
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    truncate(ckpt.checkpoints_dir(tmp_path / "b") / "value-00000002" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="tracerl"):
        resumed = run_rl(load_config(RLConfig, None, base + [f"output_dir={tmp_path / 'b'}", "resume=true"]),
                         progress=False)
    assert any("step-00000002 is incomplete (value-00000002/model.safetensors has" in r.getMessage()
               and "continuing from step-00000001" in r.getMessage() for r in caplog.records)
    for name in ("step-00000002", "value-00000002"):  # step 2 trained again, to the same weights
        assert same_weights(ckpt.checkpoints_dir(tmp_path / "a") / name, ckpt.checkpoints_dir(tmp_path / "b") / name)
    assert {k: v for k, v in resumed.items() if k.startswith("eval_")} == \
        {k: v for k, v in straight.items() if k.startswith("eval_")}
