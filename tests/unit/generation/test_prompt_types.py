"""``generate`` and ``Engine.generate`` take strings and conversations as well as token ids
(tracerl.generation.sampler.encode_prompts), and ``Generation.text`` skips special tokens while
``raw_text`` keeps them.  Real tiny-block."""

from __future__ import annotations

import pytest

from tracerl.engine import Engine
from tracerl.errors import ConfigError
from tracerl.generation import SamplingConfig, generate
from tracerl.models import load_model

CONFIG = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=4)


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-block")


def test_strings_and_conversations_equal_their_token_ids(model):
    tok = model.tokenizer
    conversation = [{"role": "user", "content": "Calculate 3 + 4 + 5."}]
    templated = tok.encode(tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)
    ids = [tok.encode("Calculate 3 + 4 + 5.", add_special_tokens=False), templated]
    for run in (lambda p: generate(model, p, CONFIG), lambda p: Engine(model).generate(p, CONFIG)):
        by_ids, by_text = run(ids), run(["Calculate 3 + 4 + 5.", conversation])
        assert [g.prompt_ids for g in by_text] == ids
        assert [g.response_ids for g in by_text] == [g.response_ids for g in by_ids]


def test_text_skips_special_tokens_raw_text_keeps_them(model):
    [gen] = generate(model, ["2+2="], SamplingConfig(max_new_tokens=8, stop_token_ids=()))
    tok = model.tokenizer
    assert gen.text == tok.decode(gen.response_ids, skip_special_tokens=True)
    assert gen.raw_text == tok.decode(gen.response_ids, skip_special_tokens=False)
    forced = generate(model, ["2+2="], SamplingConfig(max_new_tokens=8))[0]
    if forced.finish_reason == "stop":  # the random preset may or may not emit its EOS
        assert "<|endoftext|>" not in forced.text and forced.raw_text.endswith(tok.decode([forced.response_ids[-1]]))


@pytest.mark.parametrize("prompts, message", [
    ("2+2=", "must be a list of prompts"),
    ([""], "prompt 0: empty prompt"),
    ([["1", "2"]], "token ids must be integers"),
    ([[{"role": "user"}]], "a conversation is a list of"),
    ([3.5], "must be token ids, a string or a conversation"),
])
def test_bad_prompts_are_one_line_errors(model, prompts, message):
    with pytest.raises(ConfigError, match=message):
        generate(model, prompts, CONFIG)
