"""The vLLM-shaped API (tracerl.llm) and stop strings: every sample equals ``generate`` on its
prompt, config and seed; bad requests fail before any decoding.  Real tiny models."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.support.tiny_models import scrambled
from tracerl import LLM, SamplingParams
from tracerl.data.templates import render_prompt
from tracerl.engine import Engine
from tracerl.errors import ConfigError
from tracerl.generation.config import SamplingConfig
from tracerl.generation.sampler import default_stop_ids, generate
from tracerl.generation.seeds import derive_seed
from tracerl.generation.stops import stop_string_end

# The greedy response of the scrambled float64 tiny-block to "Hello" (24 tokens) holds "&f" at
# tokens 18-19 (positions 23-24: token 19 starts a block, so the stop leaves a tail) and "&&"
# earlier; neither string is in its first block.
PROMPT = "Hello"
STOP = "&f"


@pytest.fixture(scope="module")
def model():
    return scrambled("tiny-block", dtype=torch.float64)


@pytest.fixture(scope="module")
def llm(model):
    return LLM(model, max_running=4)


def encode(model, text):
    return model.tokenizer.encode(text, add_special_tokens=False)


def same(got, want):
    """Generations equal; log-probs to float tolerance (batched sums may differ in order)."""
    exact = dict(logprobs=None, confidences=None)
    assert dataclasses.replace(got, **exact) == dataclasses.replace(want, **exact)
    if want.logprobs is not None:
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-6, rtol=0)


# -- the stop-string rule ----------------------------------------------------------------------

def test_stop_string_end_finds_the_completing_token(model):
    pieces = {0: "ab", 1: "c", 2: "de", 3: "f", 4: "cd"}
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    assert stop_string_end([0, 1, 2, 3], decode, ("cd",)) == (3, "cd")  # "abcde": token 2 completes it
    assert stop_string_end([0, 1, 2, 3], decode, ("zz",)) is None
    assert stop_string_end([0, 1, 2, 3], decode, ("f", "bc")) == (2, "bc")  # the earliest end wins
    assert stop_string_end([0, 1, 2, 3], decode, ("f", "ab")) == (1, "ab")
    assert stop_string_end([0, 1], decode, ("ab",), start=2) is None  # nothing new past start
    assert stop_string_end([0, 4, 3], decode, ("ab",), start=1) == (2, "ab")  # first prefix past start
    assert stop_string_end([0, 1], decode, ()) is None
    # Real tokenizer: "é" is two byte tokens; the stop completes at the second.
    tok = model.tokenizer
    ids = tok.encode("xé!", add_special_tokens=False)
    assert stop_string_end(ids, tok.decode, ("é",)) == (3, "é")


def test_sampling_config_stop_validation():
    assert SamplingConfig(stop="ab").stop == ("ab",)
    assert SamplingConfig(stop=["a", "b"]).stop == ("a", "b")
    for bad in ([""], [3], 5):
        with pytest.raises(ConfigError, match=r"^stop: "):
            SamplingConfig(stop=bad)


# -- stop strings: engine == generate --------------------------------------------------------

def test_stop_strings_engine_equals_generate(model):
    # The long prompt left-pads the others in generate's layout (their stops shift columns).
    prompts = [encode(model, PROMPT), encode(model, "The cat"), encode(model, "a prompt of 22 tokens.")]
    free = generate(model, prompts[:1], SamplingConfig(max_new_tokens=24))[0]
    config = SamplingConfig(max_new_tokens=24, stop=(STOP, "never here"), return_logprobs=True)
    want = generate(model, prompts, config)
    got = Engine(model, max_running=2).generate(prompts, config)
    for g, w in zip(got, want):
        same(g, w)
    hit = want[0]
    assert "length" in {w.finish_reason for w in want[1:]}
    assert hit.finish_reason == "stop" and free.finish_reason == "length"
    text = model.tokenizer.decode(hit.response_ids)
    assert text.endswith(STOP) and STOP not in model.tokenizer.decode(hit.response_ids[:-1])
    assert hit.response_ids == free.response_ids[:len(hit.response_ids)] and len(hit.response_ids) < 24
    assert hit.tail_ids == free.response_ids[len(hit.response_ids):len(hit.response_ids) + len(hit.tail_ids)]
    assert hit.tail_ids and len(hit.step_map) == len(hit.logprobs) == len(hit.response_ids)
    # Batched with other rows == alone.
    same(generate(model, prompts[:1], config)[0], hit)


def test_llm_stop_string_text_and_reason(llm, model):
    params = SamplingParams(max_tokens=24, stop=[STOP], logprobs=True)
    out = llm.generate([PROMPT], [params])[0].outputs[0]
    full = model.tokenizer.decode(out.token_ids)
    assert out.finish_reason == "stop" and out.stop_reason == STOP
    assert out.text == full[:full.index(STOP)] and not out.text.endswith("&")  # "&f" removed whole
    kept = llm.generate(PROMPT, dataclasses.replace(params, include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == full and kept.text.endswith(STOP) and kept.token_ids == out.token_ids
    assert out.cumulative_logprob == pytest.approx(sum(out.logprobs))
    # A stop token: stop_reason is its id, and it stays in token_ids.
    tok_stop = llm.generate(PROMPT, SamplingParams(max_tokens=24, stop_token_ids=[38]))[0].outputs[0]
    assert tok_stop.stop_reason == 38 and tok_stop.token_ids[-1] == 38 and tok_stop.finish_reason == "stop"
    # In one block (tokens 242, 127, 38, 38), the earlier of a stop string and a stop token wins.
    string_first = llm.generate(PROMPT, SamplingParams(max_tokens=24, stop="\x7f", stop_token_ids=[38]))
    assert string_first[0].outputs[0].stop_reason == "\x7f" and string_first[0].outputs[0].token_ids[-1] == 127
    token_first = llm.generate(PROMPT, SamplingParams(max_tokens=24, stop="&&", stop_token_ids=[38]))
    assert token_first[0].outputs[0].stop_reason == 38
    assert token_first[0].outputs[0].token_ids == string_first[0].outputs[0].token_ids + [38]


# -- prompts and params ------------------------------------------------------------------------

def test_prompt_forms_and_per_prompt_params_equal_generate(llm, model):
    ids = encode(model, "abc")
    p_static = SamplingParams(max_tokens=9)
    p_dynamic = SamplingParams(max_tokens=13, strategy="dynamic", threshold=0.5, ignore_eos=True)
    prompts = ["abc", ids, {"prompt": "abc"}, {"prompt_token_ids": ids}, "The cat sat"]
    params = [p_static, p_static, p_dynamic, p_static, p_dynamic]
    out = llm.generate(prompts, params)
    assert [o.prompt for o in out] == ["abc", None, "abc", None, "The cat sat"]
    assert len({o.request_id for o in out}) == 5 and all(o.finished for o in out)
    for o, p in zip(out, params):
        assert len(o.outputs) == 1
        c = o.outputs[0]
        want = generate(model, [o.prompt_token_ids], p.to_sampling_config(model))[0]
        assert c.trace == want and c.token_ids == want.response_ids and c.step_map == want.step_map
        assert c.nfe == want.nfe and c.logprobs is None and c.cumulative_logprob is None
        assert c.text == model.tokenizer.decode(c.token_ids, skip_special_tokens=True)
    assert out[0].prompt_token_ids == ids and out[0].outputs[0].trace == out[1].outputs[0].trace
    assert out[2].outputs[0].trace == generate(model, [ids], p_dynamic.to_sampling_config(model))[0]
    # One prompt alone: a string, or one list of token ids.
    assert llm.generate("abc", p_static)[0].outputs[0].trace == out[0].outputs[0].trace
    assert llm.generate(ids, p_static)[0].outputs[0].trace == out[0].outputs[0].trace


def test_params_defaults_and_stop_token_ids_rule(model):
    p = SamplingParams()
    assert p.temperature == 0.0 and p.n == 1 and p.max_tokens == 128
    defaults = default_stop_ids(model)
    assert p.to_sampling_config(model).stop_token_ids is None  # generate's defaults
    assert SamplingParams(ignore_eos=True).to_sampling_config(model).stop_token_ids == ()
    assert SamplingParams(stop_token_ids=[7]).to_sampling_config(model).stop_token_ids == tuple(sorted({7, *defaults}))
    assert SamplingParams(stop_token_ids=[7], ignore_eos=True).to_sampling_config(model).stop_token_ids == (7,)
    c = SamplingParams(max_tokens=5, top_k=-1, logprobs=0, stop="x").to_sampling_config(model)
    assert (c.max_new_tokens, c.top_k, c.return_logprobs, c.stop) == (5, 0, True, ("x",))


def test_n_samples_with_seeds(llm, model):
    params = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=11)
    first = llm.generate(["abc", "de"], params)
    again = llm.generate(["abc", "de"], params)
    for a, b in zip(first, again):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert [c.index for c in a.outputs] == [0, 1, 2]
    samples = [c.token_ids for c in first[0].outputs]
    assert len({tuple(s) for s in samples}) > 1  # different seeds, different samples
    config = params.to_sampling_config(model)
    for i, o in enumerate(first):
        for j, c in enumerate(o.outputs):
            assert c.trace == generate(model, [o.prompt_token_ids], config, seeds=[derive_seed(11, i, j)])[0]


def test_chat_template(llm, model):
    tok = model.tokenizer
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=6))
    assert out[0].prompt_token_ids == render_prompt(tok, "hi")
    assert out[0].prompt.startswith("<|im_start|>user\nhi<|im_end|>")
    same_ids = llm.generate("hi", SamplingParams(max_tokens=6), use_chat_template=True)
    assert same_ids[0].prompt_token_ids == out[0].prompt_token_ids
    assert same_ids[0].outputs[0].trace == out[0].outputs[0].trace
    two = llm.chat([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]],
                   SamplingParams(max_tokens=6))
    assert [o.prompt_token_ids for o in two] == [render_prompt(tok, "hi"), render_prompt(tok, "yo")]


def test_full_attention_model_on_the_engine():
    llm = LLM("tiny-full")
    params = SamplingParams(max_tokens=16, stop_token_ids=[], ignore_eos=True)
    out = llm.generate(["abc", "hello there"], params)
    want = generate(llm.model, [o.prompt_token_ids for o in out], params.to_sampling_config(llm.model))
    assert [o.outputs[0].trace for o in out] == want
    assert llm.engine.stats.requests == 2  # decoded by the engine's canvases, not generate()


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, match", [
    ("max_tokens", 0, r"^max_tokens: must be an integer >= 1, got 0$"),
    ("n", 0, r"^n: "),
    ("temperature", -1.0, r"^temperature: "),
    ("temperature", float("nan"), r"^temperature: "),
    ("top_p", 0.0, r"^top_p: "),
    ("top_k", -2, r"^top_k: "),
    ("logprobs", 5, r"^logprobs: "),
    ("strategy", "best", r"^strategy: "),
    ("threshold", 2.0, r"^threshold: "),
    ("steps", 0, r"^steps: "),
    ("block_size", 0, r"^block_size: "),
    ("stop", [""], r"^stop: "),
    ("stop_token_ids", [-1], r"^stop_token_ids: "),
    ("ignore_eos", "yes", r"^ignore_eos: "),
])
def test_bad_params_name_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        SamplingParams(**{field: value})


def test_bad_requests_fail_before_decoding(llm, model):
    ok = SamplingParams(max_tokens=4)
    changed = SamplingParams(max_tokens=4)
    changed.max_tokens = 0  # made valid, changed afterwards
    cases = [
        (["ab", [1] * model.max_positions], ok, r"^request 1: prompt: 2048 tokens"),
        (["ab", ""], ok, r"^request 1: prompt: empty prompt"),
        (["ab", {"prompt": ""}], ok, r"^request 1: prompt: empty prompt"),
        (["ab", []], ok, r"^request 1: prompt_token_ids: empty prompt"),
        (["ab", [5, model.vocab_size]], ok, r"^request 1: prompt_token_ids: token id 260 outside"),
        (["ab", {"prompt_token_ids": [5, -1]}], ok, r"^request 1: prompt_token_ids: "),
        (["ab", {"text": "x"}], ok, r"^request 1: text: unknown prompt key"),
        (["ab", 3.5], ok, r"^request 1: prompt: must be"),
        (["ab", "cd"], [ok, changed], r"^request 1: max_tokens: must be an integer >= 1, got 0$"),
        (["ab", "cd"], [ok], r"^sampling_params: 1 for 2 prompts"),
        (["ab", "cd"], [ok, SamplingParams(stop="<|MASK|>")], r"^request 1: stop: .*mask token"),
        (["ab", "cd"], [ok, SamplingParams(stop_token_ids=[999])], r"^request 1: stop_token_ids: token id 999"),
        ([], ok, r"^prompts: "),
    ]
    before = llm.engine.stats.forwards
    for prompts, params, match in cases:
        with pytest.raises(ConfigError, match=match):
            llm.generate(prompts, params)
    with pytest.raises(ConfigError, match=r"^request 0: messages: "):
        llm.chat([[{"role": "user"}]])
    assert llm.engine.stats.forwards == before  # nothing was decoded
