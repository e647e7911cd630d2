"""Sampler tests: exactness of the caches, batching, AR equivalence, step maps, stops, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.support.tiny_models import scrambled
from tracerl import masks
from tracerl.errors import ConfigError
from tracerl.generation import STRATEGIES, SamplingConfig, derive_seed, generate
from tracerl.generation import sampling
from tracerl.generation.sampling import cpu_exponentials, draw, exponential_from_uniform_, sampling_distribution
from tracerl.generation.unmasking import quota_schedule, select, step_quota

EXACT_STRATEGIES = [s for s in STRATEGIES if s != "random"]


@pytest.fixture(scope="module")
def block_model():
    return scrambled("tiny-block")


@pytest.fixture(scope="module")
def shifted_model():
    return scrambled("tiny-shifted")


@pytest.fixture(scope="module")
def full_model():
    return scrambled("tiny-full")


def prompts_for(model):
    tok = model.tokenizer
    # Lengths 5, 1, 19, 12: prompt tails of every size share the first block.
    return [tok.encode(t) for t in ("Hello", "x", "What is 12 + 30? Think.", "2, 4, 8, 16,")]


def same(a, b):
    return [(g.response_ids, g.step_map, g.nfe) for g in a] == [(g.response_ids, g.step_map, g.nfe) for g in b]


# -- exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["block", "shifted"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cached_equals_uncached(family, strategy, block_model, shifted_model):
    model = block_model if family == "block" else shifted_model
    kw = dict(max_new_tokens=21, strategy=strategy, threshold=0.3, seed=3, stop_token_ids=(), steps=3)
    cached = generate(model, prompts_for(model), SamplingConfig(use_cache=True, **kw))
    uncached = generate(model, prompts_for(model), SamplingConfig(use_cache=False, **kw))
    assert same(cached, uncached)
    assert len({tuple(g.response_ids) for g in cached}) > 1  # not a degenerate output


@pytest.mark.parametrize("name", ["block", "shifted", "full"])
@pytest.mark.parametrize("strategy", EXACT_STRATEGIES)
def test_batched_equals_one_by_one(name, strategy, block_model, shifted_model, full_model):
    model = {"block": block_model, "shifted": shifted_model, "full": full_model}[name]
    config = SamplingConfig(max_new_tokens=17, strategy=strategy, threshold=0.3, stop_token_ids=())
    prompts = prompts_for(model)
    batched = generate(model, prompts, config)
    single = [generate(model, [p], config)[0] for p in prompts]
    assert same(batched, single)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_approximate_caches_exact_when_one_step_per_block(mode, full_model):
    # Fast-dLLM caches are refreshed at each block's first step, so with one step per block they
    # must reproduce the no-cache decoding exactly; with more steps they may differ.
    base = dict(max_new_tokens=24, block_size=4, steps=1, stop_token_ids=())
    ref = generate(full_model, prompts_for(full_model), SamplingConfig(full_cache="none", **base))
    got = generate(full_model, prompts_for(full_model), SamplingConfig(full_cache=mode, **base))
    assert same(ref, got)
    more = generate(full_model, prompts_for(full_model),
                    SamplingConfig(full_cache=mode, max_new_tokens=24, block_size=4, stop_token_ids=()))
    assert all(len(g.response_ids) == 24 for g in more)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_approximate_caches_shifted_full_attention_short_prompts(mode):
    # Dream-like: logits shifted, bidirectional attention, every prompt shorter than the block,
    # so the first block starts at column 0 (which nothing predicts).
    model = scrambled("tiny-shifted", attention="full", block_size=8)
    prompts = [[5, 6, 7], [8, 9]]
    base = dict(max_new_tokens=16, steps=1, stop_token_ids=())
    ref = generate(model, prompts, SamplingConfig(full_cache="none", **base))
    assert same(ref, generate(model, prompts, SamplingConfig(full_cache=mode, **base)))


def test_shifted_block1_greedy_equals_autoregressive():
    model = scrambled("tiny-shifted")
    tok = model.tokenizer
    for text in ("The quick brown fox", "a"):
        ids = tok.encode(text)
        ours = generate(model, [ids], SamplingConfig(max_new_tokens=40, block_size=1, steps=1, stop_token_ids=()))
        ref = model.backbone.generate(
            torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=None,
            pad_token_id=tok.pad_token_id,
        )
        assert ours[0].response_ids == ref[0, len(ids):].tolist()
        assert len(set(ours[0].response_ids)) > 3


# -- the trace ------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["static", "dynamic", "margin"])
def test_step_map_replays_to_the_tokens(strategy, block_model):
    """Teacher-forcing the trace: the state before step n (tokens with step < n visible, the rest
    masked) must make the greedy sampler pick exactly the tokens recorded at step n."""
    model = block_model
    b, steps = 4, 4
    prompt = model.tokenizer.encode("What is 12 + 30? Think.")
    gen = generate(model, [prompt], SamplingConfig(max_new_tokens=22, strategy=strategy, threshold=0.3,
                                                   stop_token_ids=()))[0]
    sm = torch.tensor(gen.step_map)
    assert len(gen.step_map) == len(gen.response_ids)
    blocks = (len(prompt) + torch.arange(len(sm))) // b
    for k in blocks.unique():  # every block's steps come after all steps of earlier blocks
        assert sm[blocks == k].min() > (sm[blocks < k].max() if (blocks < k).any() else 0)
        assert sm[blocks == k].max() - sm[blocks == k].min() < steps
    assert (sm[1:] >= 0).all() and sorted(set(sm.tolist())) == list(range(1, gen.nfe + 1))

    full = torch.tensor(prompt + gen.response_ids)[None]
    pos = torch.arange(full.shape[1])[None]
    valid = torch.ones_like(full, dtype=torch.bool)
    mask = masks.block_causal_mask(pos, b, key_valid=valid)
    for n in range(1, gen.nfe + 1):
        state = full.clone()
        hidden_cols = len(prompt) + torch.nonzero(sm >= n).squeeze(-1)
        state[0, hidden_cols] = model.mask_token_id
        # Block-causal: later blocks don't influence this one, so masking them changes nothing.
        logits = model(state, attention_mask=mask, position_ids=pos)
        logits[..., model.mask_token_id] = float("-inf")
        cols = len(prompt) + torch.nonzero(sm == n).squeeze(-1)
        assert logits[0, cols].argmax(-1).tolist() == full[0, cols].tolist()


def test_logprobs_are_those_of_the_sampling_distribution(block_model):
    gen = generate(block_model, prompts_for(block_model)[:1],
                   SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=50, seed=1, return_logprobs=True,
                                  stop_token_ids=()))[0]
    assert len(gen.logprobs) == len(gen.confidences) == len(gen.response_ids)
    for lp, c in zip(gen.logprobs, gen.confidences):
        assert 0 < c <= 1 and lp == pytest.approx(torch.tensor(c).log().item())


# -- stops, limits, masks -------------------------------------------------------------------


def test_stop_token_cuts_right_after_first_occurrence(block_model):
    model = block_model
    prompt = prompts_for(model)[2]
    free = generate(model, [prompt], SamplingConfig(max_new_tokens=30, stop_token_ids=()))[0]
    stop = free.response_ids[9]
    first = free.response_ids.index(stop)
    cut = generate(model, [prompt], SamplingConfig(max_new_tokens=30, stop_token_ids=(stop,)))[0]
    assert cut.response_ids == free.response_ids[: first + 1]
    assert cut.step_map == free.step_map[: first + 1]
    assert cut.finish_reason == "stop" and free.finish_reason == "length"
    # A stop token inside the prompt is not a stop.
    in_prompt = generate(model, [prompt + [stop]], SamplingConfig(max_new_tokens=6, stop_token_ids=(stop,)))[0]
    assert len(in_prompt.response_ids) >= 1 and in_prompt.prompt_ids[-1] == stop


def test_max_new_tokens_and_partial_last_block(block_model):
    for n in (1, 3, 4, 7):
        gens = generate(block_model, prompts_for(block_model), SamplingConfig(max_new_tokens=n, stop_token_ids=()))
        assert [len(g.response_ids) for g in gens] == [n] * 4
        assert all(g.finish_reason == "length" for g in gens)


def test_never_emits_mask_token_even_when_it_is_the_most_likely(block_model):
    model = scrambled("tiny-block")
    with torch.no_grad():
        model.backbone.lm_head.weight[model.mask_token_id] *= 100  # tied: also its embedding
        model.backbone.get_output_embeddings().bias = None
    gen = generate(model, prompts_for(model), SamplingConfig(max_new_tokens=12, temperature=1.0, seed=0,
                                                             stop_token_ids=()))
    assert all(model.mask_token_id not in g.response_ids for g in gen)


def test_prompt_tokens_never_overwritten_when_block_exceeds_steps(block_model):
    # Upstream bug: block > steps could overwrite fixed tokens in the first block.
    prompt = block_model.tokenizer.encode("abcdefg")  # 7 tokens: tail of 7 in a block of 16
    gen = generate(block_model, [prompt], SamplingConfig(max_new_tokens=20, block_size=16, steps=3,
                                                          stop_token_ids=()))[0]
    assert gen.prompt_ids == prompt and len(gen.response_ids) == 20
    assert gen.nfe <= 3 * 2  # two blocks touched, at most `steps` forwards each


def test_dynamic_threshold_extremes(block_model):
    prompts = prompts_for(block_model)
    static = generate(block_model, prompts, SamplingConfig(max_new_tokens=16, stop_token_ids=()))
    strict = generate(block_model, prompts, SamplingConfig(max_new_tokens=16, strategy="dynamic", threshold=1.0,
                                                           stop_token_ids=()))
    assert same(static, strict)  # confidence > 1 never happens: dynamic falls back to static
    eager = generate(block_model, prompts, SamplingConfig(max_new_tokens=16, strategy="dynamic", threshold=1e-12,
                                                          stop_token_ids=()))
    for g in eager:  # every block decoded in one forward
        blocks = {(len(g.prompt_ids) + j) // 4 for j in range(len(g.response_ids))}
        assert g.nfe == len(blocks)


# -- unmasking rules and sampling (unit level) ----------------------------------------------


def test_step_quota_spreads_evenly():
    m = torch.tensor([4, 8, 4, 3, 0, 2])
    got = torch.stack([step_quota(m, torch.full_like(m, s), 4) for s in range(4)], 1)
    # Fewer masks than steps: one per step, then (never reached) "everything left".
    assert got.tolist() == [[1, 1, 1, 1], [2, 2, 2, 2], [1, 1, 1, 1], [1, 1, 1, 3], [0, 0, 0, 0], [1, 1, 2, 2]]
    m = torch.tensor([4])  # 4 masks, 3 steps -> (2, 1, 1)
    assert [step_quota(m, torch.tensor([s]), 3).item() for s in range(3)] == [2, 1, 1]


def test_quota_schedule_is_step_quota_at_every_step():
    """The engine's per-request schedule (Python ints, cached) equals the tensor rule step by step
    over the block's budget, for every mask count and step budget of blocks up to 16."""
    for steps in range(1, 17):
        for m in range(0, 17):
            sched = quota_schedule(m, steps)
            assert len(sched) == max(1, min(m, steps)) and sum(sched) == m
            ms = torch.full((len(sched),), m)
            assert list(sched) == step_quota(ms, torch.arange(len(sched)), steps).tolist()
            # numpy in, numpy out: the same numbers
            assert list(sched) == step_quota(ms.numpy(), np.arange(len(sched)), steps).tolist()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rules_select_only_masked_and_at_least_quota(strategy):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(6, 8, 30, generator=g) * 3
        d = draw(logits, temperature=1.0, top_k=0, top_p=1.0, banned_ids=None, generator=g)
        masked = torch.rand(6, 8, generator=g) < 0.6
        quota = torch.randint(0, 4, (6,), generator=g)
        chosen = select(strategy, d, masked, quota, threshold=0.5, eb_threshold=0.5, generator=g)
        assert not (chosen & ~masked).any()
        assert (chosen.sum(-1) >= torch.minimum(quota, masked.sum(-1))).all()
        if strategy in ("static", "sequential", "random", "margin"):
            assert (chosen.sum(-1) == torch.minimum(quota, masked.sum(-1))).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("per_row", [False, True])
def test_rules_on_numpy_arrays_select_what_they_select_on_tensors(strategy, per_row):
    """The engine selects on numpy views on the CPU: every rule must pick exactly the positions
    its torch form picks, ties included (confidences from a few distinct logits tie often), NaN
    scores and numpy-float thresholds included, and draw the random rule's noise from the same
    streams."""
    g = torch.Generator().manual_seed(1)
    for trial in range(30):
        logits = torch.randint(0, 3, (7, 8, 5), generator=g).float()  # coarse logits: many equal scores
        d = draw(logits, temperature=1.0, top_k=0, top_p=1.0, banned_ids=None, generator=g)
        masked = torch.rand(7, 8, generator=g) < 0.7
        quota = torch.randint(0, 5, (7,), generator=g)
        if trial % 3 == 0:  # a broken model's NaN scores (torch ranks NaN as the largest)
            d.confidence[1, 2:5] = float("nan")
            d.probs[2, 3] = float("nan")

        def streams():  # the same seeds for both forms
            seeds = range(100 * trial, 100 * trial + 7)
            return [torch.Generator().manual_seed(s) for s in seeds] if per_row else \
                torch.Generator().manual_seed(100 * trial)

        # Thresholds on the boundary: a confidence of the draw, and a partial sum of row 0's
        # sorted entropies as torch computes it, so any rounding difference changes the pick.
        entropy = -(d.probs * d.probs.clamp_min(1e-30).log()).sum(-1)
        budget = torch.sort(entropy.masked_fill(~masked, float("inf")), dim=-1).values.cumsum(-1)[0, 2]
        kw = dict(threshold=np.float64(d.confidence[0, 0]) - 1e-12,
                  eb_threshold=np.float64(budget if budget.isfinite() else 1.5) + 1e-12)  # float64: off float32
        on_tensors = select(strategy, d, masked, quota, generator=streams(), **kw)
        on_arrays = select(strategy, d, masked.numpy(), quota.numpy(), generator=streams(), **kw)
        assert isinstance(on_arrays, np.ndarray) and on_arrays.dtype == np.bool_
        assert on_arrays.tolist() == on_tensors.tolist(), (strategy, trial)


def test_static_picks_most_confident_and_sequential_leftmost():
    conf = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    d = draw(torch.zeros(1, 4, 5), temperature=0, top_k=0, top_p=1, banned_ids=None, generator=None)
    d.confidence = conf
    masked = torch.tensor([[True, True, False, True]])
    q = torch.tensor([2])
    assert select("static", d, masked, q, threshold=.5, eb_threshold=1, generator=None).tolist() == [[False, True, False, True]]
    assert select("sequential", d, masked, q, threshold=.5, eb_threshold=1, generator=None).tolist() == [[True, True, False, False]]
    assert select("dynamic", d, masked, torch.tensor([1]), threshold=0.6, eb_threshold=1, generator=None).tolist() == [[False, True, False, True]]


def test_sampling_distribution_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    assert sampling_distribution(logits, 1.0, 1, 1.0).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    p = sampling_distribution(logits, 1.0, 0, 0.7)
    full = torch.softmax(logits, -1)
    assert full[0, 0] < 0.7 < full[0, :2].sum()  # the nucleus is the top two tokens
    assert torch.allclose(p[0, :2], full[0, :2] / full[0, :2].sum()) and p[0, 2:].sum() == 0
    assert torch.allclose(sampling_distribution(logits, 0.5, 0, 1.0), torch.softmax(logits / 0.5, -1))


def test_temperature_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))[None, None].expand(1, 4000, 3)
    g = torch.Generator().manual_seed(0)
    d = draw(logits, temperature=1.0, top_k=0, top_p=1.0, banned_ids=None, generator=g)
    freq = torch.bincount(d.tokens.flatten(), minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)
    again = draw(logits, temperature=1.0, top_k=0, top_p=1.0, banned_ids=None, generator=torch.Generator().manual_seed(0))
    assert torch.equal(d.tokens, again.tokens)


# -- per-request random streams -------------------------------------------------------------

RANDOMIZED = {
    "sampled-static": dict(temperature=1.0),
    "random-rule": dict(strategy="random"),
    "sampled-random-rule": dict(strategy="random", temperature=1.0, steps=2),
    "sampled-dynamic": dict(strategy="dynamic", threshold=0.5, temperature=1.0),
    # Rows stop in different blocks, so they stop drawing at different forwards.
    "sampled-with-stops": dict(temperature=1.0, stop_token_ids=tuple(range(100, 140))),
}
STREAM_SEEDS = [11, 2**63 + 5, 0, 987654321, 42]


def traces(gens):
    return [g.to_dict() for g in gens]


def stream_prompts(model):
    return prompts_for(model) + [model.tokenizer.encode("Hi there, friend")]  # lengths 5, 1, 19, 12, 16


@pytest.mark.parametrize("name", ["block", "full", "shifted"])
@pytest.mark.parametrize("variant", RANDOMIZED)
def test_sampled_row_does_not_depend_on_its_batch(name, variant, block_model, shifted_model, full_model):
    """A request's output is a function of (model, prompt, seed, config): alone, in a batch of
    prompts of other lengths, and in any order of that batch, token for token and step for step."""
    model = {"block": block_model, "shifted": shifted_model, "full": full_model}[name]
    config = SamplingConfig(**{"max_new_tokens": 15, "stop_token_ids": (), **RANDOMIZED[variant]})
    prompts = stream_prompts(model)[: len(STREAM_SEEDS)]
    alone = [generate(model, [p], config, seeds=[s])[0] for p, s in zip(prompts, STREAM_SEEDS)]
    for order in (range(len(prompts)), [3, 0, 4, 2, 1], [2, 4]):
        got = generate(model, [prompts[i] for i in order], config, seeds=[STREAM_SEEDS[i] for i in order])
        assert traces(got) == traces([alone[i] for i in order]), order
    assert len({tuple(g.response_ids) for g in alone}) == len(alone)  # not a degenerate output
    if variant == "sampled-with-stops":
        assert {g.finish_reason for g in alone} == {"stop", "length"}


@pytest.mark.parametrize("variant", ["sampled-static", "random-rule"])
def test_different_seeds_give_different_samples(variant, block_model):
    config = SamplingConfig(max_new_tokens=12, stop_token_ids=(), **RANDOMIZED[variant])
    prompt = prompts_for(block_model)[2]
    same_prompt = generate(block_model, [prompt] * 4, config, seeds=[1, 2, 3, 4])
    assert len({(tuple(g.response_ids), tuple(g.step_map)) for g in same_prompt}) > 1
    prompts = prompts_for(block_model)
    a = generate(block_model, prompts, config, seeds=[1, 2, 3, 4])
    b = generate(block_model, prompts, config, seeds=[5, 6, 7, 8])
    assert traces(a) != traces(b)
    assert traces(a) == traces(generate(block_model, prompts, config, seeds=[1, 2, 3, 4]))  # reproducible


def test_base_seed_means_derived_seed_per_position(block_model):
    prompts = prompts_for(block_model)
    config = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=7, stop_token_ids=())
    by_config = generate(block_model, prompts, config)
    explicit = generate(block_model, prompts, config, seeds=[derive_seed(7, i) for i in range(len(prompts))])
    assert traces(by_config) == traces(explicit)
    repeated = generate(block_model, [prompts[0]] * 4, config)  # position i: its own stream
    assert len({tuple(g.response_ids) for g in repeated}) > 1


def test_greedy_ignores_seeds(block_model):
    prompts = prompts_for(block_model)
    config = SamplingConfig(max_new_tokens=12, stop_token_ids=())
    ref = generate(block_model, prompts, config)
    assert traces(ref) == traces(generate(block_model, prompts, config, seeds=[9, 8, 7, 6]))
    assert traces(ref) == traces(generate(block_model, prompts, SamplingConfig(**{**config.to_dict(), "seed": 3})))


@pytest.mark.parametrize("seeds", [[1, 2, 3], [1, 2, 3, 4, 5], [1, 2, -3, 4], [1, 2.0, 3, 4], [1, True, 3, 4],
                                   [1, "2", 3, 4], [1, 2, 3, 2**64], 5, "1234"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_bad_seeds_name_the_option(seeds, temperature, block_model):
    config = SamplingConfig(max_new_tokens=4, temperature=temperature)
    with pytest.raises(ConfigError, match="seeds") as err:
        generate(block_model, prompts_for(block_model), config, seeds=seeds)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3"])
def test_bad_config_seed(seed):
    with pytest.raises(ConfigError, match="seed"):
        SamplingConfig(seed=seed)


def test_derive_seed_is_stable_and_separates_keys():
    assert derive_seed(1, 2, 3) == 6520558355739401531  # blake2b-64 of the 8-byte LE keys, >> 1
    keys = [(0,), (1,), (0, 0), (1, 2), (2, 1), (1, 2, 0), (1, 2, 3), (2**64 - 1,), (7, 0), (7, 1)]
    seeds = [derive_seed(*k) for k in keys]
    assert len(set(seeds)) == len(keys)
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds)
    for bad in (-1, 1.5, True, "3", None, 2**64):
        with pytest.raises(ConfigError, match="derive_seed") as err:
            derive_seed(4, bad)
        assert repr(bad) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        derive_seed()


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_cpu_exponentials_are_exponential_bit_for_bit(monkeypatch, chunk_rows):
    """The per-row race noise drawn as float64 uniforms + one vectorised log1p equals what
    ``exponential_`` draws from each row's generator, and leaves every stream where
    ``exponential_`` leaves it (also when the rows are processed a few at a time)."""
    shape = (6, 4, 100_003)
    if chunk_rows:
        monkeypatch.setattr(sampling, "CHUNK_ELEMENTS", chunk_rows * shape[1] * shape[2])
    fast_gens = [torch.Generator().manual_seed(100 + r) for r in range(shape[0])]
    slow_gens = [torch.Generator().manual_seed(100 + r) for r in range(shape[0])]
    slow = torch.empty(shape)
    for r, g in enumerate(slow_gens):
        slow[r].exponential_(1.0, generator=g)
    assert torch.equal(cpu_exponentials(shape, fast_gens), slow)
    for fast, ref in zip(fast_gens, slow_gens):
        assert torch.equal(torch.rand(3, generator=fast), torch.rand(3, generator=ref))


def test_exponential_from_uniform_matches_libm_at_float_midpoints():
    """Values a hair from a float32 rounding midpoint are where the vectorised log1p and libm's
    can round to different floats (a few hundred of these 20,000 without the recomputation)."""
    f = torch.rand(20_000, generator=torch.Generator().manual_seed(0)) * 5 + 1e-3
    midpoint = (f.double() + torch.nextafter(f, torch.tensor(float("inf"))).double()) / 2
    u = -torch.expm1(-midpoint)
    libm = torch.tensor([-math.log1p(-v) for v in u.tolist()], dtype=torch.float64).float()
    assert torch.equal(exponential_from_uniform_(u.clone()), libm)


def test_argmax_last_dim_is_torch_argmax():
    """The numpy argmax taken on CPU float tensors picks torch's index: first maximum on ties,
    first NaN, any shape (1-D included) and stride; an empty uniform batch gives no noise."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (6, 5, 7), generator=g).float()  # many ties
    x[1, 2, 3] = x[4, 0, 6] = float("nan")
    for t in (x, x.double(), x.transpose(0, 2), x[0, 0], x[:, :, ::2]):
        assert torch.equal(sampling.argmax_last_dim(t), t.argmax(-1))
    assert exponential_from_uniform_(torch.empty(0, 3, dtype=torch.float64)).shape == (0, 3)


def test_per_row_generators_in_draw_and_select():
    """Row r draws (tokens, then the random rule's noise) from generators[r] only, exactly as that
    row alone would; None rows draw nothing; the per-row draw follows the sampling distribution."""
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))[None, None].expand(3, 3000, 3)
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, banned_ids=None)
    masked = torch.ones(3, 3000, dtype=torch.bool)
    masked[1] = False
    quota = torch.tensor([5, 0, 5])

    def step(rows, seeds):
        gens = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
        d = draw(logits[rows], **kw, generator=gens)
        chosen = select("random", d, masked[rows], quota[rows], threshold=0.5, eb_threshold=0.5, generator=gens)
        return d.tokens, chosen, gens

    tokens, chosen, gens = step([0, 1, 2], [1, 2, 3])
    for r in (0, 2):
        alone_tokens, alone_chosen, _ = step([r], [r + 1])
        assert torch.equal(tokens[r], alone_tokens[0]) and torch.equal(chosen[r], alone_chosen[0])
        freq = torch.bincount(tokens[r], minlength=3).float() / 3000
        assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)
    assert chosen.sum(-1).tolist() == [5, 0, 5]
    tokens_none, _, _ = step([0, 1, 2], [1, None, 3])
    assert torch.equal(tokens_none[[0, 2]], tokens[[0, 2]])  # a row without a generator changes no one


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,option", [
    (dict(strategy="fastest"), "strategy"),
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=1.5), "threshold"),
    (dict(steps=0), "steps"),
    (dict(block_size=0), "block_size"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(full_cache="triple"), "full_cache"),
])
def test_bad_options_name_the_option(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        SamplingConfig(**kwargs)


def test_bad_prompts(block_model):
    with pytest.raises(ConfigError, match="empty"):
        generate(block_model, [[]], SamplingConfig())
    with pytest.raises(ConfigError, match="context"):
        generate(block_model, [[65] * block_model.max_positions], SamplingConfig())
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        generate(block_model, [[65, 10**6]], SamplingConfig())


# -- command line ---------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tracerl.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_generate_json():
    out = run_cli("generate", "--model", "tiny-block", "--prompt", "Hello there", "--max-new-tokens", "10",
                  "--strategy", "dynamic", "--threshold", "0.5", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"text", "token_ids", "step_map", "nfe"} <= set(data)
    assert len(data["token_ids"]) == len(data["step_map"]) <= 10
    assert 259 not in data["token_ids"]  # the tiny tokenizer's mask id


def test_cli_generate_bad_option_is_one_line():
    out = run_cli("generate", "--prompt", "Hi", "--threshold", "2", "--strategy", "dynamic")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "threshold" in out.stderr
    out = run_cli("generate", "--prompt", "", "--json")
    assert out.returncode == 2 and "prompt" in out.stderr


def test_cli_chat_template():
    out = run_cli("generate", "--prompt", "Hi", "--chat", "--max-new-tokens", "4", "--json")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["prompt_ids"][:1] == [257]  # <|im_start|>
