"""SFT data formats (tracerl/data/sft_formats.py) with the real tiny tokenizer and its chat
template: conversations supervise assistant turns only, TRL's prompt/completion rows, templated
string prompts, one format per file, and a short real SFT run on a conversation file."""

from __future__ import annotations

import json
import logging

import pytest

from tests.unit.train.test_train import base_config, make
from tracerl.data.jsonl import DataError
from tracerl.models import load_model
from tracerl.recipes.sft import run_sft
from tracerl.train.metrics import read_metrics
from tracerl.train.sft import SFTDataConfig, build_examples, check_sft_data

TALK = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}]


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-block")


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def texts(model, examples):
    tok = model.tokenizer
    return [(tok.decode(e.prompt_ids, skip_special_tokens=False), tok.decode(e.response_ids, skip_special_tokens=False))
            for e in examples]


def data(file, **kw) -> SFTDataConfig:
    return SFTDataConfig(file=file, pad_to_block=False, **kw)


def test_a_conversation_gives_one_example_per_assistant_turn(model, tmp_path, caplog):
    f = write(tmp_path / "talk.jsonl", [{"messages": TALK, "id": 3}])
    with caplog.at_level(logging.INFO):
        check_sft_data(data(f))
    assert "1 rows in the messages format" in caplog.text
    examples, dropped = build_examples(model, data(f))
    tok = model.tokenizer
    first = tok.apply_chat_template(TALK[:2], add_generation_prompt=True, tokenize=False)
    second = tok.apply_chat_template(TALK[:4], add_generation_prompt=True, tokenize=False)
    assert texts(model, examples) == [(first, "A1<|im_end|><|endoftext|>"), (second, "A2<|im_end|><|endoftext|>")]
    assert dropped == 0
    # Only assistant text is supervised: no user or system text in any response.
    assert all("U" not in r and "S" not in r for _, r in texts(model, examples))


def test_trl_prompt_completion_rows(model, tmp_path):
    plain = write(tmp_path / "pc.jsonl", [{"prompt": "1+1=", "completion": "2"}])
    assert texts(model, build_examples(model, data(plain))[0]) == [("1+1=", "2<|endoftext|>")]
    chat = write(tmp_path / "pcc.jsonl", [{"prompt": TALK[:4], "completion": [TALK[4]]}])
    [(prompt, response)] = texts(model, build_examples(model, data(chat))[0])  # A1 is context, not a target
    assert prompt.endswith("<|im_start|>assistant\n") and "A1" in prompt and response == "A2<|im_end|><|endoftext|>"


def test_string_prompts_can_take_the_chat_template(model, tmp_path):
    f = write(tmp_path / "pr.jsonl", [{"prompt": "1+1=", "response": "2"}])
    [(raw, _)] = texts(model, build_examples(model, data(f))[0])
    [(templated, _)] = texts(model, build_examples(model, data(f, chat=True))[0])
    assert raw == "1+1=" and templated == model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+1="}], add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "response": "b"}, {"messages": TALK}], r"x.jsonl:2: a messages row in a prompt-response file"),
    ([{"prompt": "a"}], r"x.jsonl:1: no known format \(keys: prompt\); a row has one of: messages; prompt\+completion"),
    ([{"messages": TALK[:2]}], r"x.jsonl:1: field 'messages': no assistant turn to train on"),
    ([{"messages": [{"role": "wizard", "content": "x"}]}], r"x.jsonl:1: messages\[0\]: expected"),
    ([{"prompt": TALK[:2], "completion": "x"}], r"x.jsonl:1: prompt and completion must both be strings"),
    ([{"messages": TALK, "step_map": [1]}], r"x.jsonl:1: step_map goes with"),
])
def test_bad_files_name_the_line(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        check_sft_data(data(write(tmp_path / "x.jsonl", rows)))


def test_a_file_and_a_task_warns_that_the_task_is_unused(tmp_path, caplog):
    f = write(tmp_path / "pr.jsonl", [{"prompt": "1+1=", "response": "2"}])
    cfg = data(f)
    cfg.task.name = "basic_arithmetic"
    with caplog.at_level(logging.WARNING):
        check_sft_data(cfg)
    assert "data.file is set, so data.task (gym:basic_arithmetic) is not used" in caplog.text


def test_sft_trains_on_a_conversation_file(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}]}
            for a in range(4) for b in range(4)]
    f = write(tmp_path / "chat.jsonl", rows)
    cfg = base_config(tmp_path / "run", max_steps=3, save_every=3, data={"file": f}, loop={"micro_batch": 4})
    out = run_sft(make(cfg), progress=False)
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["targets"] > 0 for m in metrics)
    assert out["final_checkpoint"]
