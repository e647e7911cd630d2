"""Canvas batching for full-attention models: every request's output equals ``generate`` on that
request alone, for ``full_cache`` none (exact), prefix and dual (Fast-dLLM's approximate caches,
reproduced per request), greedy and seeded sampling, whatever runs beside it.

Scrambled float64 models (tests/support/tiny_models.py): varied, sharp outputs, and a different
batch layout cannot move a logit enough to flip an argmax or a threshold."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from tests.support.tiny_models import scrambled
from tracerl.engine import Engine
from tracerl.errors import ConfigError
from tracerl.generation.config import SamplingConfig
from tracerl.generation.sampler import generate


def generate_canvases(model, prompts, configs=None, seeds=None, *, max_running=64):
    """The engine on a full-attention model: its outputs and stats."""
    engine = Engine(model, max_running=max_running)
    return engine.generate(prompts, configs, seeds), engine.stats

# Two byte ids frequent in tiny-full's greedy outputs, at varied response positions: some
# responses stop early (mid-block, leaving a tail), some run to their length.
STOPS = (109, 203)
MODES = ("none", "prefix", "dual")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine a descheduled
    thread stalls the others at every op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return scrambled("tiny-full", dtype=torch.float64)


def prompts_for(n: int, seed: int, longest: int = 20) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(3, 250) for _ in range(rng.randint(1, longest))] for _ in range(n)]


def alone(model, prompts, configs, seeds):
    """The reference: ``generate`` on each request by itself."""
    return [generate(model, [p], c, seeds=None if s is None else [s])[0]
            for p, c, s in zip(prompts, configs, seeds)]


def assert_same(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        exact = dict(logprobs=None, confidences=None)
        assert dataclasses.replace(g, **exact) == dataclasses.replace(w, **exact), f"request {i}"
        assert (g.logprobs is None) == (w.logprobs is None), f"request {i}"
        if w.logprobs is not None:
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.tensor(g.confidences), torch.tensor(w.confidences), atol=1e-5, rtol=0)


def greedy_configs(mode: str, rng: random.Random) -> list[SamplingConfig]:
    """Each strategy at two lengths in 8..40 (a mix of whole and cut-short last blocks); at most
    4 steps per block to keep the test short."""
    kinds = [dict(strategy="static", steps=4, return_logprobs=True), dict(strategy="dynamic", threshold=0.6),
             dict(strategy="margin", steps=2), dict(strategy="entropy_bounded", steps=4)]
    return [SamplingConfig(max_new_tokens=rng.randint(8, 40), stop_token_ids=STOPS, full_cache=mode, **k)
            for k in kinds for _ in range(2)]


@pytest.mark.parametrize("mode", MODES)
def test_many_requests_equal_generate_alone(model, mode):
    rng = random.Random(1)
    # 54 requests in the uncached mode (the 50+ exactness bar); prefix / dual, which
    # approximate the model but must still equal generate()'s own caches, with 30 (suite time).
    count = 54 if mode == "none" else 30
    prompts = prompts_for(count, seed=2)
    choices = greedy_configs(mode, rng)
    configs = [rng.choice(choices) for _ in prompts]
    order = list(range(len(prompts)))
    rng.shuffle(order)  # submitted in random order
    prompts, configs = [prompts[i] for i in order], [configs[i] for i in order]
    got, stats = generate_canvases(model, prompts, configs, max_running=8)
    assert_same(got, alone(model, prompts, configs, [None] * len(prompts)))

    assert {g.finish_reason for g in got} == {"stop", "length"}
    # A stop leaves the rest of its block and, with full attention, every later (never decoded,
    # still masked) position up to the canvas end as the tail, with step 0.
    tails = [g for g in got if g.finish_reason == "stop" and model.mask_token_id in g.tail_ids]
    assert tails and all(g.tail_steps[-1] == 0 for g in tails)
    assert stats.requests == count and stats.preemptions == 0
    assert stats.row_forwards == sum(g.nfe for g in got)
    # Slots are refilled at every block step: only the last few steps run short.
    assert 0.75 < stats.slot_occupancy <= 1 and stats.rows_per_forward <= 8
    if mode == "none":
        assert stats.model_calls == stats.forwards and stats.cached_row_forwards == 0
    else:  # full-forward rows (a block's first step) and cached rows run in separate calls
        assert stats.forwards < stats.model_calls <= 2 * stats.forwards
        assert 0 < stats.cached_row_forwards < stats.row_forwards


def test_approximate_caches_really_run(model):
    """prefix / dual differ from the exact mode somewhere (their cached steps are used), and
    from each other."""
    prompts = prompts_for(6, seed=9)
    out = {}
    for mode in MODES:
        config = SamplingConfig(max_new_tokens=32, stop_token_ids=(), full_cache=mode, return_logprobs=True)
        out[mode], _ = generate_canvases(model, prompts, config, max_running=4)
    for a, b in (("none", "prefix"), ("none", "dual"), ("prefix", "dual")):
        assert any(x.logprobs != y.logprobs for x, y in zip(out[a], out[b])), (a, b)


def test_seeded_sampling_alone_equals_in_a_crowd(model):
    targets = [SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=0, stop_token_ids=STOPS,
                              full_cache=mode, return_logprobs=True) for mode in MODES]
    others = [
        SamplingConfig(max_new_tokens=20, temperature=0.7, top_k=20, stop_token_ids=STOPS, full_cache="dual"),
        SamplingConfig(max_new_tokens=30, temperature=1.0, top_p=0.8, strategy="random", stop_token_ids=STOPS),
        SamplingConfig(max_new_tokens=12, strategy="dynamic", stop_token_ids=STOPS, full_cache="prefix"),
    ]
    prompts = prompts_for(18, seed=3)
    rng = random.Random(4)
    configs = targets + [rng.choice(others + targets) for _ in prompts[3:]]
    seeds = [rng.randrange(2**63) for _ in prompts]
    crowd, _ = generate_canvases(model, prompts, configs, seeds, max_running=5)
    assert_same(crowd, alone(model, prompts, configs, seeds))
    for i in range(3):  # each target alone in the engine
        single, _ = generate_canvases(model, prompts[i:i + 1], configs[i:i + 1], seeds[i:i + 1])
        assert_same(single, crowd[i:i + 1])
    # Another seed gives another sample (the stream is really used).
    other, _ = generate_canvases(model, prompts[:1], targets[0], [seeds[0] + 1])
    assert other[0].response_ids != crowd[0].response_ids
    # Without seeds=, a config seed gives request i derive_seed(seed, i), as generate does.
    seeded = dataclasses.replace(targets[1], seed=77)
    got, _ = generate_canvases(model, prompts[:4], seeded, max_running=2)
    assert_same(got, generate(model, prompts[:4], seeded))


def test_output_does_not_depend_on_max_running(model):
    """Mixed modes, block sizes and sampling in one run: the same outputs at any max_running."""
    rng = random.Random(5)
    choices = [
        SamplingConfig(max_new_tokens=24, stop_token_ids=STOPS, full_cache="none"),
        SamplingConfig(max_new_tokens=19, strategy="dynamic", threshold=0.6, stop_token_ids=STOPS, full_cache="prefix"),
        SamplingConfig(max_new_tokens=21, strategy="margin", steps=2, stop_token_ids=STOPS, full_cache="dual"),
        SamplingConfig(max_new_tokens=16, temperature=1.0, stop_token_ids=STOPS, full_cache="dual", block_size=4),
        SamplingConfig(max_new_tokens=16, temperature=0.8, top_k=30, stop_token_ids=STOPS, use_cache=False,
                       full_cache="prefix"),  # use_cache=False: the exact reference
    ]
    prompts = prompts_for(14, seed=6)
    configs = [rng.choice(choices) for _ in prompts]
    seeds = [rng.randrange(2**63) for _ in prompts]
    runs = {k: generate_canvases(model, prompts, configs, seeds, max_running=k) for k in (1, 3, 14)}
    for k in (1, 3):
        assert_same(runs[k][0], runs[14][0])
    forwards = [runs[k][1].forwards for k in (1, 3, 14)]
    assert forwards[0] > forwards[1] > forwards[2]
    assert runs[14][1].model_calls > runs[14][1].forwards  # phases ran in separate calls
    assert_same(runs[3][0], alone(model, prompts, configs, seeds))


def test_context_limit_cuts_the_last_block():
    small = scrambled("tiny-full", dtype=torch.float64)
    small.config.max_position_embeddings = 30  # canvases end at 30: not a block boundary
    prompts = prompts_for(4, seed=7) + [[70] * 29, [71] * 24, [72] * 13]
    configs = [SamplingConfig(max_new_tokens=64, stop_token_ids=(), full_cache=MODES[i % 3])
               for i in range(len(prompts))]
    got, _ = generate_canvases(small, prompts, configs, max_running=3)
    assert_same(got, alone(small, prompts, configs, [None] * len(prompts)))
    assert all(len(p) + len(g.response_ids) == 30 for p, g in zip(prompts, got))


def test_shifted_full_attention_equals_generate():
    """A shifted family with full attention (column c-1 predicts c) in every mode."""
    shifted = scrambled("tiny-shifted", dtype=torch.float64, attention="full")
    prompts = prompts_for(9, seed=8, longest=10)  # some shorter than a block: column 0 in the block
    configs = [SamplingConfig(max_new_tokens=14, strategy="dynamic", threshold=0.6, stop_token_ids=(),
                              full_cache=MODES[i % 3], return_logprobs=True) for i in range(len(prompts))]
    got, _ = generate_canvases(shifted, prompts, configs, max_running=4)
    assert_same(got, alone(shifted, prompts, configs, [None] * len(prompts)))


def test_refusals(model):
    with pytest.raises(ConfigError, match="^num_pages, budget_bytes: full-attention models have no KV page pool"):
        Engine(model, num_pages=8)
    with pytest.raises(ConfigError, match="^max_running"):
        generate_canvases(model, [[5, 6]], SamplingConfig(max_new_tokens=4), max_running=0)
    with pytest.raises(ConfigError, match="^configs"):
        generate_canvases(model, [[5], [6]], [SamplingConfig(max_new_tokens=4)])
    with pytest.raises(ConfigError, match="^seeds"):
        generate_canvases(model, [[5], [6]], SamplingConfig(max_new_tokens=4), seeds=[1])
    with pytest.raises(ConfigError, match="^prompt 0"):
        generate_canvases(model, [[]], SamplingConfig(max_new_tokens=4))
