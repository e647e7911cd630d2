"""Several ranks (tracerl/train/distributed.py) with real torchrun processes on gloo: 2 ranks equal
1 rank with doubled accumulation, a killed rank stops the other within a bounded time, exact
resume at the same world size (refused at another), a two-node launch on one machine, the
exported HF folder, and the refusals of bad launches."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support import torchrun
from tests.unit.train.test_train import base_config, comparable, gym_task, letters_jsonl, make, write_config
from tracerl.errors import ConfigError
from tracerl.generation import SamplingConfig, generate
from tracerl.models import load_model
from tracerl.recipes.sft import run_sft
from tracerl.train import checkpoint as ckpt
from tracerl.train import distributed
from tracerl.train.metrics import read_metrics

STEPS, EVERY = 8, 2


def rank_config(root: Path, name: str, accumulation: int) -> dict:
    data = root / "data.jsonl"
    if not data.exists():
        letters_jsonl(data, 32, 24, 96)
    return base_config(root / name, max_steps=STEPS, save_every=EVERY,
                       data={"file": str(data), "task": {"source": "gym", "name": "basic_arithmetic",
                                                          "split": "train", "size": 1}},
                       loop={"micro_batch": 4, "accumulation": accumulation, "report_to": ["none"]},
                       # rank 0 evaluates (the wiring; that the inference copy follows the weights is
                       # shown by tests/unit/rl/test_ranks.py, whose rollouts use it every step)
                       eval={"every": 4, "task": {**gym_task("eval", 8), "seed": 1},
                             "sampling": {"max_new_tokens": 8, "strategy": "static", "temperature": 0.0}})


def launch(root: Path, name: str, *extra: str, **kw) -> subprocess.CompletedProcess:
    cfg = write_config(root / f"{name}.yaml", rank_config(root, name, accumulation=1))
    done = torchrun.run(["sft", str(cfg), *extra], **kw)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    two = launch(root, "two")
    one = run_sft(make(rank_config(root, "one", accumulation=2)), progress=False)
    return {"root": root, "two": root / "two", "one": Path(one["final_checkpoint"]).parents[1], "stdout": two.stdout}


def final(run_dir: Path) -> Path:
    return ckpt.list_checkpoints(run_dir)[-1]


def test_two_ranks_equal_one_rank_with_doubled_accumulation(runs):
    two, one = read_metrics(runs["two"] / "metrics.jsonl"), read_metrics(runs["one"] / "metrics.jsonl")
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))  # rank 0 alone logs, once per step
    for a, b in zip(two, one):
        assert a["tokens"] == b["tokens"] and a["targets"] == b["targets"]  # the same batches and masks
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        for key in ("eval_accuracy", "eval_response_length", "eval_nfe_per_token"):
            assert a.get(key) == b.get(key), (a["step"], key)
    assert [r["step"] for r in two if "eval_accuracy" in r] == [4, 8]
    wa, wb = load_file(str(final(runs["two"]) / "model.safetensors")), load_file(str(final(runs["one"]) / "model.safetensors"))
    start = load_model("tiny-block").backbone.state_dict()
    assert wa.keys() == wb.keys()
    assert max(float((wb[k] - start[k]).abs().max()) for k in wb) > 1e-3  # it trained
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)
    # Sharded state: one DCP file per rank next to the HF weights; one summary, from rank 0.
    assert sorted(p.name for p in (final(runs["two"]) / ckpt.SHARDS).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert runs["stdout"].count("world_size") == 1


def test_exported_folder_loads_and_generates(runs):
    folder = final(runs["two"])
    info = subprocess.run([sys.executable, "-m", "tracerl", "info", str(folder)], capture_output=True, text=True)
    assert info.returncode == 0 and "block" in info.stdout, info.stderr
    model = load_model(str(folder))
    out = generate(model, [model.tokenizer.encode("abc")], SamplingConfig(max_new_tokens=8, temperature=0.0))
    assert len(out[0].response_ids) == 8 and out[0].nfe > 0


def test_killed_rank_stops_the_other_and_the_run_resumes_exactly(runs):
    root = runs["root"]
    cfg = write_config(root / "killed.yaml", rank_config(root, "killed", accumulation=1))
    proc, seconds, err = torchrun.kill_rank_after(["sft", str(cfg)], root / "killed", checkpoint_step=EVERY)
    assert proc.returncode != 0 and seconds < 60, (seconds, err[-2000:])
    # Whoever sees the death first names rank 1: rank 0's failed collective, or torchrun's report
    # (its monitor may SIGTERM rank 0 before the collective fails: "rank      : 1 ... SIGKILL").
    ours = "rank 1 died or stopped responding" in err
    launchers = re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", err) is not None
    assert ours or launchers, err[-2000:]
    kept = ckpt.list_checkpoints(root / "killed")
    assert kept and all(ckpt.checkpoint_problem(p) is None for p in kept)  # the last complete ones intact
    assert ckpt.step_of(kept[-1]) < STEPS

    # Another world size is refused before anything is touched ...
    with pytest.raises(ConfigError, match="written by 2 rank"):
        run_sft(make(rank_config(root, "killed", accumulation=2), "resume=true"), progress=False)
    # ... the same one ends exactly where the uninterrupted run ends.
    launch(root, "killed", "resume=true")
    assert comparable(read_metrics(root / "killed" / "metrics.jsonl")) == comparable(read_metrics(runs["two"] / "metrics.jsonl"))
    wa, wb = load_file(str(final(root / "killed") / "model.safetensors")), load_file(str(final(runs["two"]) / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_nodes_on_one_machine_equal_one_node(runs):
    root = runs["root"]
    cfg = write_config(root / "nodes.yaml", rank_config(root, "nodes", accumulation=1))
    port = torchrun.free_port()
    nodes = [subprocess.Popen(torchrun.command(["sft", str(cfg)], nproc=1, nodes=(2, rank), port=port),
                              env=torchrun.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    assert comparable(read_metrics(root / "nodes" / "metrics.jsonl")) == comparable(read_metrics(runs["two"] / "metrics.jsonl"))


def test_a_rank_with_another_config_is_refused(tmp_path):
    script = tmp_path / "launch.py"
    cfg = write_config(tmp_path / "c.yaml", rank_config(tmp_path, "c", accumulation=1))
    script.write_text("import os, sys\nfrom tracerl.cli import main\n"
                      f"main(['sft', '--no-progress', {str(cfg)!r}, 'seed=' + os.environ['RANK']])\n")
    done = torchrun.run([], script=script, timeout=120)
    assert done.returncode != 0
    assert "rank 1's config differs from rank 0's in seed: 0 -> 1" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "c" / "metrics.jsonl").exists()


def test_bad_launches_are_refused_before_any_work(tmp_path, monkeypatch):
    cfg = make(rank_config(tmp_path, "bad", accumulation=1))
    monkeypatch.setenv("WORLD_SIZE", "2")  # one of two processes, but not started by torchrun
    with pytest.raises(ConfigError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        run_sft(cfg, progress=False)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")  # `srun -n 2 tracerl sft ...`
    with pytest.raises(ConfigError, match="one of 2 tasks"):
        run_sft(cfg, progress=False)
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(torchrun.free_port())}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="nccl needs CUDA"):
        distributed.start(distributed.DistributedConfig(backend="nccl"), "cpu")
    with pytest.raises(ConfigError, match="give 'cuda'"):
        distributed.rank_device("cuda:1", distributed.World(rank=0, size=2))
    assert not (tmp_path / "bad").exists()


def test_a_second_run_into_the_same_output_dir_is_refused(tmp_path):
    cfg = make(rank_config(tmp_path, "busy", accumulation=1))
    held = ckpt.OutputLock(tmp_path / "busy")
    assert held.acquire() is None
    try:
        with pytest.raises(ConfigError, match="in use by another run"):
            run_sft(cfg, progress=False)
    finally:
        held.release()
    assert not (tmp_path / "busy" / "metrics.jsonl").exists()


def test_lora_on_two_ranks_equals_one_rank_and_resumes_exactly(tmp_path):
    """LoRA under FSDP2: the adapters train sharded beside the frozen base; 2 ranks equal 1 rank
    with doubled accumulation, the checkpoint holds the adapter and the merged weights (gathered
    to rank 0), and a resume from the shards ends where the uninterrupted run ends."""
    adapter = {"enabled": True, "r": 4, "alpha": 8}
    cfg = {**rank_config(tmp_path, "two", accumulation=1), "lora": adapter, "max_steps": 4}
    done = torchrun.run(["sft", str(write_config(tmp_path / "two.yaml", cfg))])
    assert done.returncode == 0, done.stderr[-3000:]
    one = run_sft(make({**rank_config(tmp_path, "one", accumulation=2), "lora": adapter, "max_steps": 4}),
                  progress=False)
    two_rows, one_rows = read_metrics(tmp_path / "two" / "metrics.jsonl"), read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in two_rows] == [1, 2, 3, 4]
    for a, b in zip(two_rows, one_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    two_final, one_final = final(tmp_path / "two"), Path(one["final_checkpoint"])
    ad2 = load_file(str(two_final / "adapter" / "adapter_model.safetensors"))
    ad1 = load_file(str(one_final / "adapter" / "adapter_model.safetensors"))
    assert ad2.keys() == ad1.keys() and any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in ad2.items())
    for k in ad2:
        torch.testing.assert_close(ad2[k], ad1[k], rtol=0, atol=1e-5, msg=k)
    merged2, merged1 = load_file(str(two_final / "model.safetensors")), load_file(str(one_final / "model.safetensors"))
    assert merged2.keys() == merged1.keys() and not any("lora" in k for k in merged2)
    for k in merged2:
        torch.testing.assert_close(merged2[k], merged1[k], rtol=0, atol=1e-5, msg=k)
    assert torch.load(two_final / "trainer_state.pt", weights_only=False)["lora"] is True

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    shutil.rmtree(final(resumed))  # as if killed after step 2's checkpoint
    done = torchrun.run(["sft", str(write_config(tmp_path / "resumed.yaml", {**cfg, "output_dir": str(resumed)})),
                         "resume=true"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert comparable(read_metrics(resumed / "metrics.jsonl")) == comparable(two_rows)
    again = load_file(str(final(resumed) / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(again[k], ad2[k]) for k in ad2)
