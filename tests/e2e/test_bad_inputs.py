"""Bad inputs, end to end through the real `tracerl` command: each is one line on stderr that
names the key or the file (with the line, and for bad bytes the byte offset), exit status 2,
no traceback, and nothing half-written left behind.  Write failures are real: a read-only or a
tiny (full) tmpfs mounted for the test (tests/support/disks.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.support import REPO
from tests.support.disks import mounted_tmpfs

GYM = ["template=raw", "chat=false", "size=2"]


def cli(*args, cwd=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "tracerl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO)


def one_line_error(done, command: str, *words: str) -> str:
    """The single stderr line of a refused command (exit 2, no traceback), checked for ``words``."""
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tracerl {command}: error: "), done.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# -- seeds ----------------------------------------------------------------------------------------


TASK_SEED = "must be in [0, 2**31), got -1"


@pytest.mark.parametrize("command,args,message", [
    # pool_matrix seeds numpy with task.seed + index: -1 was a numpy traceback ("Seed must be between 0
    # and 2**32 - 1"); other generators took it silently.
    ("eval", [*(f"task.{a}" for a in GYM), "task.name=pool_matrix", "task.seed=-1"], f"task.seed: {TASK_SEED}"),
    ("sft", [*(f"data.task.{a}" for a in GYM), "data.task.seed=-1", "max_steps=1"], f"data.task.seed: {TASK_SEED}"),
    ("sft", ["eval.every=1", *(f"eval.task.{a}" for a in GYM), "eval.task.seed=-1", "max_steps=1"],
     f"eval.task.seed: {TASK_SEED}"),
    ("rl", ["task.seed=-1", "max_steps=1"], f"task.seed: {TASK_SEED}"),
    ("quickstart", ["heldout.task.seed=-1"], f"heldout.task.seed: {TASK_SEED}"),
    # 2**64 was a ValueError traceback from torch.manual_seed once the model had loaded.
    ("sft", [*(f"data.task.{a}" for a in GYM), f"seed={2**64}", "max_steps=1"],
     f"seed: must be an integer in [0, 2**64), got {2**64}"),
    ("rl", ["seed=-1", "max_steps=1"], "seed: must be an integer in [0, 2**64), got -1"),
])
def test_a_bad_seed_names_its_key(tmp_path, command, args, message):
    done = cli(command, *args, f"output_dir={tmp_path / 'out'}", "--no-progress", cwd=tmp_path)
    one_line_error(done, command, message)
    assert not (tmp_path / "out").exists()


# -- YAML -----------------------------------------------------------------------------------------


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """1 KB of nested aliases ("billion laughs": 9**9 values once expanded) in data.task.params
    used to hang the command with no output; it is refused at the alias that crosses the budget."""
    lines = ["data:", "  task:", "    params:", '      a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"      a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 1100
    done = cli("sft", bomb, f"output_dir={tmp_path / 'out'}", "--no-progress", timeout=60)
    one_line_error(done, "sft", f"{bomb}:", "aliases expand to more than")


def test_a_config_that_is_not_utf8_names_the_line_and_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"max_steps: 1\n# caf\xe9 au lait\noutput_dir: out\n")
    done = cli("sft", path, "--no-progress")
    one_line_error(done, "sft", f"{path}:2:", "not UTF-8", "byte 0xe9 at offset 18")


# -- data files that are not UTF-8 ----------------------------------------------------------------


def test_a_score_input_that_is_not_utf8_names_the_line_and_byte(tmp_path):
    src = tmp_path / "gens.jsonl"
    src.write_bytes(b'{"response": "12", "ground_truth_answer": "12"}\n{"response": "caf\xe9", "ground_truth_answer": "1"}\n')
    done = cli("score", "--task", "math", "--input", src, "--output", tmp_path / "out.jsonl")
    one_line_error(done, "score", f"{src}:2:", "not UTF-8", "byte 0xe9 at offset 65")
    assert list(tmp_path.iterdir()) == [src]  # no output, no temporary file


def test_sft_and_eval_files_that_are_not_utf8_name_the_line_and_byte(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    one_line_error(cli("sft", f"data.file={data}", "max_steps=1", f"output_dir={tmp_path / 's'}", "--no-progress"),
                   "sft", f"{data}:2:", "byte 0xff at offset 45")
    problems = tmp_path / "eval.jsonl"
    problems.write_bytes(b'{"question": "1+1", "ground_truth_answer": "2"}\n{"question": "\xff\xfe", "ground_truth_answer": "2"}\n')
    one_line_error(cli("eval", "task.source=jsonl", f"task.name={problems}", f"output_dir={tmp_path / 'e'}",
                       "--no-progress"), "eval", f"{problems}:2:", "byte 0xff at offset 62")


# -- score: skipped rows and outputs --------------------------------------------------------------


def test_score_skip_bad_rows_reports_a_broken_line_and_writes_the_rest(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"response": "12", "ground_truth_answer": "12"}\n'
                    b'{"response": "1\n'
                    b'{"response": "\xff", "ground_truth_answer": "4"}\n'
                    b'{"response": "3", "ground_truth_answer": "4"}\n')
    out = tmp_path / "out.jsonl"
    done = cli("score", "--task", "math", "--input", src, "--output", out, "--skip-bad-rows", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["scored"] == 2 and summary["skipped"] == 2
    assert [r.split(": ", 1)[0] for r in summary["skipped_rows"]] == [f"{src}:2", f"{src}:3"]
    assert "invalid JSON" in summary["skipped_rows"][0] and "not UTF-8" in summary["skipped_rows"][1]
    for reason in summary["skipped_rows"]:
        assert f"tracerl score: skipped {reason}" in done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, None, None, False]
    assert rows[1] == {"raw": '{"response": "1', "reward": None, "correct": None, "error": summary["skipped_rows"][0]}
    assert rows[2]["raw"] == '{"response": "\ufffd", "ground_truth_answer": "4"}'


GOOD = '{"response": "12", "ground_truth_answer": "12"}\n'


def test_score_output_that_is_a_directory_fails_before_scoring(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(GOOD * 3)
    folder = tmp_path / "folder"
    folder.mkdir()
    one_line_error(cli("score", "--task", "math", "--input", src, "--output", folder), "score",
                   f"{folder}: is a directory")
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["folder", "in.jsonl"]


def test_score_output_on_a_read_only_disk_names_the_path(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(GOOD)
    with mounted_tmpfs(tmp_path / "ro", readonly=True) as ro:
        one_line_error(cli("score", "--task", "math", "--input", src, "--output", ro / "x.jsonl"), "score",
                       f"{ro / 'x.jsonl'}: cannot write (Read-only file system)")


def test_score_output_on_a_full_disk_leaves_no_partial_file(tmp_path):
    src = tmp_path / "in.jsonl"
    row = json.dumps({"response": "12", "ground_truth_answer": "12", "pad": "x" * 3000}) + "\n"
    src.write_text(row * 6)  # 18 KB of output for an 8 KB disk
    with mounted_tmpfs(tmp_path / "full", size="8k") as full:
        one_line_error(cli("score", "--task", "math", "--input", src, "--output", full / "x.jsonl", "--no-progress"), "score",
                       f"{full / 'x.jsonl'}: cannot write (No space left on device)")
        assert list(full.iterdir()) == []


# -- checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["3m", "6m"])  # the weights do not fit / the trainer state does not
def test_a_full_disk_while_saving_a_checkpoint_is_one_line(tmp_path, size):
    with mounted_tmpfs(tmp_path / "disk", size=size) as disk:
        done = cli("sft", f"output_dir={disk / 'run'}", "max_steps=1", *(f"data.task.{a}" for a in GYM),
                   "data.task.size=8", "loop.report_to=[none]", "--no-progress")
        one_line_error(done, "sft", f"{disk / 'run' / 'checkpoints' / 'step-00000001'}: cannot write the checkpoint "
                       "(No space left on device)", "last good checkpoint: none")
        assert list((disk / "run" / "checkpoints").iterdir()) == []  # no half-written folder


def test_a_resume_past_a_truncated_checkpoint_says_so_in_one_line(tmp_path):
    args = ["max_steps=2", "save_every=1", *(f"data.task.{a}" for a in GYM), "loop.report_to=[none]",
            f"output_dir={tmp_path / 'run'}", "--no-progress"]
    assert cli("sft", *args).returncode == 0
    state = tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    done = cli("sft", "resume=true", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("tracerl sft: warning: resume: checkpoint step-00000002 is incomplete (trainer_state.pt "
                           "has 1000 bytes, ")
    assert line.endswith("continuing from step-00000001 (the incomplete one is kept as step-00000002.incomplete)")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


# -- models: token ids past the vocabulary, non-finite weights ------------------------------------


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    from tracerl.models import load_model

    root = tmp_path_factory.mktemp("models")
    model = load_model("tiny-block")
    model.save_pretrained(root / "tiny")
    with torch.no_grad():
        model.backbone.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
        model.backbone.model.norm.weight[3] = float("inf")
    model.save_pretrained(root / "nan")
    return root


def test_a_vocab_size_below_the_pad_id_names_the_key(saved_tiny, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for f in (saved_tiny / "tiny").iterdir():
        (small / f.name).write_bytes(f.read_bytes())
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = 200  # the tiny tokenizer's pad/eos is 256
    (small / "config.json").write_text(json.dumps(config))
    one_line_error(cli("info", small), "info", f"{small / 'config.json'}:", "pad_token_id=256",
                   "vocab_size=200")


def test_info_lists_non_finite_weights_and_generate_and_eval_refuse(saved_tiny, tmp_path):
    names = ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    done = cli("info", saved_tiny / "nan", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["nonfinite_parameters"] == names
    assert json.loads(cli("info", saved_tiny / "tiny", "--json").stdout.splitlines()[-1])["nonfinite_parameters"] == []
    done = cli("generate", "--model", saved_tiny / "nan", "--prompt", "hi", "--max-new-tokens", "4")
    one_line_error(done, "generate", "non-finite weights", *names)
    assert done.stdout == ""
    out = tmp_path / "eval"
    one_line_error(cli("eval", f"model={saved_tiny / 'nan'}", *(f"task.{a}" for a in GYM), f"output_dir={out}",
                       "--no-progress"), "eval", "non-finite weights", *names)
    assert not out.exists() or list(out.iterdir()) == []  # no summary, no samples, no temporary file
