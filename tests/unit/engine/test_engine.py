"""Continuous-batching engine: every request's output equals ``generate`` on that request alone
(greedy and seeded sampling), whatever runs beside it, under preemption too.  Real tiny models.

Scrambled float64 models (tests/support/tiny_models.py): varied, sharp outputs, and a different
batch layout cannot move a logit enough to flip an argmax or a threshold."""

from __future__ import annotations

import dataclasses
import gc
import random

import pytest
import torch

from tests.support.tiny_models import scrambled
from tracerl.engine import Engine
from tracerl.errors import ConfigError
from tracerl.generation.config import SamplingConfig
from tracerl.generation.sampler import generate

# Two byte ids frequent in each model's greedy outputs: some responses stop early, some do not.
STOPS = {"tiny-block": (186, 80), "tiny-shifted": (150, 187)}


@pytest.fixture(scope="module", params=list(STOPS))
def model(request):
    m = scrambled(request.param, dtype=torch.float64)
    m.test_stops = STOPS[request.param]
    m.test_name = request.param
    return m


def stops(model):
    return model.test_stops


def prompts_for(n: int, seed: int, longest: int = 20) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(3, 250) for _ in range(rng.randint(1, longest))] for _ in range(n)]


def reference(model, prompts, configs, seeds=None):
    """``generate`` per group of requests sharing a config (it is batch-invariant)."""
    out = [None] * len(prompts)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(id(c), []).append(i)
    for members in groups.values():
        got = generate(model, [prompts[i] for i in members], configs[members[0]],
                       seeds=None if seeds is None else [seeds[i] for i in members])
        for i, g in zip(members, got):
            out[i] = g
    return out


def assert_same(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        exact = dict(logprobs=None, confidences=None)
        assert dataclasses.replace(g, **exact) == dataclasses.replace(w, **exact), f"request {i}"
        if w.logprobs is not None:
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.tensor(g.confidences), torch.tensor(w.confidences), atol=1e-5, rtol=0)


def greedy_configs(model):
    s = stops(model)
    return [
        SamplingConfig(max_new_tokens=64, strategy="static", stop_token_ids=s, return_logprobs=True),
        SamplingConfig(max_new_tokens=40, strategy="dynamic", threshold=0.6, stop_token_ids=s),
        SamplingConfig(max_new_tokens=23, strategy="margin", steps=2, stop_token_ids=s),
        SamplingConfig(max_new_tokens=64, strategy="sequential", stop_token_ids=s),
        SamplingConfig(max_new_tokens=17, strategy="entropy_bounded", eb_threshold=0.5, stop_token_ids=s),
        SamplingConfig(max_new_tokens=9, strategy="static", steps=3, stop_token_ids=()),
    ]


def test_greedy_many_requests_equal_generate(model):
    rng = random.Random(1)
    prompts = prompts_for(54, seed=2)
    choices = greedy_configs(model)
    configs = [rng.choice(choices) for _ in prompts]
    order = list(range(len(prompts)))
    rng.shuffle(order)
    engine = Engine(model, max_running=8)
    got = engine.generate([prompts[i] for i in order], [configs[i] for i in order])
    want = reference(model, [prompts[i] for i in order], [configs[i] for i in order])
    assert_same(got, want)
    reasons = {g.finish_reason for g in got}
    assert reasons == {"stop", "length"}
    assert any(g.tail_ids for g in got)  # a stop mid-block keeps the rest of its block as tail
    st = engine.stats
    assert st.forwards > 0 and st.preemptions == 0 and st.requests == 54
    # Slots are refilled at every block step: only the last few forwards run short.
    assert st.rows_per_forward <= 8 and 0.75 < st.slot_occupancy <= 1 and 0 < st.forward_fraction < 1
    assert st.forwards < st.model_calls  # prefills admitted mid-run had a forward of their own


def test_engine_leaves_no_reference_cycles(model):
    """Each forward's paged view (with its gather buffers) and each call's page pool are freed by
    reference counting when done, not when the garbage collector happens to run (on a GPU the
    buffers of uncollected views would hold device memory)."""
    engine = Engine(model, max_running=4)
    prompts, config = prompts_for(10, seed=5), SamplingConfig(max_new_tokens=24, stop_token_ids=stops(model))
    engine.generate(prompts[:2], config)  # anything created once (lazy model buffers) exists now
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        engine.generate(prompts, config)
        assert engine.stats.forwards > 20
        unreachable = gc.collect()
        kinds = sorted({type(o).__name__ for o in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert unreachable == 0, f"reference cycles left by the engine: {kinds}"


def test_seeded_sampling_alone_equals_in_a_crowd(model):
    s = stops(model)
    target = SamplingConfig(max_new_tokens=30, temperature=1.0, stop_token_ids=s, return_logprobs=True)
    others = [
        SamplingConfig(max_new_tokens=20, temperature=0.7, top_k=20, stop_token_ids=s),
        SamplingConfig(max_new_tokens=30, temperature=1.0, top_p=0.8, strategy="random", stop_token_ids=s),
        SamplingConfig(max_new_tokens=12, strategy="dynamic", stop_token_ids=s),
    ]
    prompts = prompts_for(20, seed=3)
    rng = random.Random(4)
    configs = [target] + [rng.choice(others + [target]) for _ in prompts[1:]]
    seeds = [rng.randrange(2**63) for _ in prompts]
    crowd = Engine(model, max_running=6).generate(prompts, configs, seeds=seeds)
    alone = Engine(model, max_running=6).generate(prompts[:1], configs[:1], seeds=seeds[:1])
    assert_same(crowd[:1], alone)
    assert_same(alone, generate(model, prompts[:1], target, seeds=seeds[:1]))
    assert_same(crowd, reference(model, prompts, configs, seeds))
    # Another seed gives another sample (the stream is really used).
    other = Engine(model).generate(prompts[:1], target, seeds=[seeds[0] + 1])
    assert other[0].response_ids != alone[0].response_ids


def test_preemption_gives_identical_outputs(model):
    s = stops(model)
    prompts = prompts_for(14, seed=5)
    configs = [SamplingConfig(max_new_tokens=32, stop_token_ids=s),
               SamplingConfig(max_new_tokens=32, temperature=1.0, stop_token_ids=s)] * 7
    seeds = list(range(100, 114))
    unlimited = Engine(model, max_running=8)
    want = unlimited.generate(prompts, configs, seeds=seeds)
    need = max(-(-(len(p) + 32) // model.block_size) for p in prompts)  # pages of the largest
    small = Engine(model, max_running=8, num_pages=need + 2)  # far less than 8 requests at once
    got = small.generate(prompts, configs, seeds=seeds)
    assert_same(got, want)
    assert small.stats.preemptions > 0 and small.stats.wasted_row_forwards > 0
    assert small.stats.slot_occupancy < unlimited.stats.slot_occupancy
    assert small.cache.num_free == small.cache.num_pages  # every page came back
    # The tightest pool (the largest request alone) still completes everything: no deadlock.
    tight = Engine(model, max_running=8, num_pages=need)
    assert_same(tight.generate(prompts, configs, seeds=seeds), want)
    assert tight.stats.preemptions > 0
    # The pool is reused by the next call.
    assert_same(small.generate(prompts[:3], configs[:3], seeds=seeds[:3]), want[:3])


@pytest.mark.parametrize("block_size", [4, 8])
def test_context_limit_cuts_the_last_block(model, block_size):
    """Positions past the model's context are invalid: the last block is partial."""
    small = scrambled(model.test_name, dtype=torch.float64, block_size=block_size)
    small.config.max_position_embeddings = 30  # ends at 30: not a block boundary
    prompts = prompts_for(10, seed=7) + [[70] * 29, [71] * 24]
    configs = [SamplingConfig(max_new_tokens=64, stop_token_ids=()),
               SamplingConfig(max_new_tokens=64, strategy="dynamic", temperature=0.8, stop_token_ids=stops(model))]
    configs = [configs[i % 2] for i in range(len(prompts))]
    seeds = list(range(len(prompts)))
    got = Engine(small, max_running=5).generate(prompts, configs, seeds=seeds)
    assert_same(got, reference(small, prompts, configs, seeds))
    assert all(len(p) + len(g.response_ids) <= 30 for p, g in zip(prompts, got))
    assert len(got[-2].response_ids) == 1 and got[0].finish_reason == "length"


def test_request_larger_than_pool_is_refused(model):
    engine = Engine(model, num_pages=4)
    prompt = [65, 66]  # needs 2 pages with 4 new tokens, 17 with 64
    with pytest.raises(ConfigError, match=r"^num_pages: request 1 .* needs up to \d+ KV pages, the pool has 4"):
        engine.generate([prompt, prompt], [SamplingConfig(max_new_tokens=4), SamplingConfig(max_new_tokens=64)])
    assert engine.stats.forwards == 0  # refused before any work
    with pytest.raises(ConfigError, match="^block_size"):
        engine.generate([prompt], SamplingConfig(max_new_tokens=4, block_size=model.block_size * 2))
    with pytest.raises(ConfigError, match="^configs"):
        engine.generate([prompt, prompt], [SamplingConfig()])
