"""d1 / diffu-GRPO (rl/algorithms/d1.py): the loss by hand, Eq. (2)'s centred advantages, the rows
(fully masked completion, randomly masked prompt, a new mask per pass) for every family, the
one-step estimate equal to the sampler's first-step log-probs, and a short run that learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support.tiny_models import picks_seven_or_eight, scrambled
from tracerl.config import load_config
from tracerl.errors import ConfigError
from tracerl.generation import SamplingConfig, generate
from tracerl.masks import CLEAN, NOISY, PROMPT
from tracerl.models import load_model
from tracerl.objectives import Example, as_example, group_advantages, target_logprobs
from tracerl.rl import RLConfig, make_algorithm


def d1(*overrides):
    return make_algorithm(load_config(RLConfig, None, ["policy.method=d1", *overrides]).policy)


def prompt_draws(seed, prompt_lengths, p):
    """The documented draw order: one float64 uniform per prompt token, example after example."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, generator=g, dtype=torch.float64) < p).numpy() for n in prompt_lengths]


# -- the loss -----------------------------------------------------------------------------------


def test_loss_equals_the_hand_written_diffu_grpo_formula_values_and_gradients():
    """Eq. (4) per token as d1's trainer writes it: −min(ρA, clip(ρ, 1−ε, 1+ε)A) + β k3, summed
    over completion tokens and divided by their count (token mean); ε = 0.5, β = 0.04 (d1)."""
    alg = d1("policy.eps=0.5", "policy.beta=0.04", "policy.kl_reference=initial")
    # Two responses (3 + 2 tokens); ratios inside the band, above 1+ε with A > 0 (clipped) and
    # below 1−ε with A < 0 (clipped), above 1+ε with A < 0 (not clipped).
    logp0 = torch.tensor([-1.0, -0.3, -2.0, -0.5, -4.0], dtype=torch.float64)
    old = torch.tensor([-1.2, -1.5, -1.9, -1.5, -2.0], dtype=torch.float64)
    ref = torch.tensor([-0.8, -0.2, -2.5, -0.4, -3.0], dtype=torch.float64)
    adv = torch.tensor([0.75, 0.75, 0.75, -0.25, -0.25], dtype=torch.float64)

    logp = logp0.clone().requires_grad_(True)
    loss, stats = alg.loss(logp, old, adv, normaliser=5.0, ref_logprobs=ref, weights=None, rows=None)
    loss.backward()

    mine = logp0.clone().requires_grad_(True)
    ratio = torch.exp(mine - old)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 0.5, 1.5) * adv
    per_token = -torch.min(unclipped, clipped) + 0.04 * (torch.exp(ref - mine) - (ref - mine) - 1)
    mask = torch.ones(5, dtype=torch.float64)  # d1's completion_mask
    want = (per_token * mask).sum() / mask.sum()
    want.backward()

    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    torch.testing.assert_close(logp.grad, mine.grad, rtol=1e-12, atol=1e-14)
    # The clipped tokens (1: ρ = e^1.2 > 1.5 with A > 0; 4: ρ = e^-2 < 0.5 with A < 0) have no
    # policy gradient, only the KL's: β (1 − exp(ref − logp)).
    kl_grad = 0.04 * (1 - torch.exp(ref - logp0)) / 5
    torch.testing.assert_close(logp.grad[[1, 4]], kl_grad[[1, 4]])
    assert stats["clip_fraction"] == pytest.approx(2 / 5)


def test_sequence_mean_weights_give_eq_4s_per_completion_mean():
    """sequence_mean: weights mean_len/|o_i|, so with the token-mean normaliser over the step the
    loss is 1/G Σ_i 1/|o_i| Σ_k ℓ_ik (Eq. (4)); the default weights are all 1 (d1's code)."""
    model = load_model("tiny-full")
    exs = [Example([5, 6, 7], [10, 11, 12, 13]), Example([8, 9], [14]), Example([5], [15, 16, 17])]
    lengths = torch.tensor([4.0, 1.0, 3.0], dtype=torch.float64)
    plain = d1().rows(model, exs, torch.Generator().manual_seed(0), block_size=None, pad_id=None)
    assert torch.all(plain.target_weight == 1)
    rows = d1("policy.options.d1.sequence_mean=true").rows(model, exs, torch.Generator().manual_seed(0),
                                                             block_size=None, pad_id=None)
    torch.testing.assert_close(rows.target_weight.double(), (lengths.mean() / lengths)[rows.target_example])

    per_token = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.5, -0.2, 0.7, 0.1], dtype=torch.float64)  # ℓ_ik
    logp = torch.zeros(8, dtype=torch.float64)
    alg = d1("policy.options.d1.sequence_mean=true")
    # A per-token advantage -ℓ at ratio 1 makes the policy part of the loss exactly Σ w ℓ / N.
    loss, _ = alg.loss(logp, logp, -per_token, normaliser=float(lengths.sum()), ref_logprobs=None,
                       weights=rows.target_weight.double(), rows=rows)
    by_response = [per_token[rows.target_example == i].mean() for i in range(3)]
    assert float(loss.detach()) == pytest.approx(float(sum(by_response) / 3), rel=1e-6)


def test_advantages_are_centred_not_divided_by_the_std_eq_2():
    rewards = np.array([1, 0, 0, 0, 1, 1, 1, 1, 0.5, 1, 0, 0.5])
    groups = np.repeat([0, 1, 2], 4)
    adv, keep = d1().advantages(rewards, groups, None)
    want = np.r_[np.array([1, 0, 0, 0]) - 0.25, np.zeros(4), np.array([0.5, 1, 0, 0.5]) - 0.5]
    np.testing.assert_allclose(adv.numpy(), want, atol=1e-7)
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4  # policy.filter_equal (default)
    _, keep_all = d1("policy.filter_equal=false").advantages(rewards, groups, None)
    assert keep_all.all()
    z, _ = d1("policy.options.d1.std_normalise=true").advantages(rewards, groups, None)
    torch.testing.assert_close(z, group_advantages(rewards, groups)[0])


def test_options_are_checked_and_name_the_key():
    assert d1().options.p_mask_prompt == 0.15 and d1().rows_per_epoch
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError, match=r"policy\.options\.d1.*p_mask_prompt"):
            d1(f"policy.options.d1.p_mask_prompt={bad}")


# -- rows -----------------------------------------------------------------------------------------


def test_block_rows_mask_every_response_block_and_the_same_prompt_positions_in_both_copies():
    """Two-copy rows: prompt' | clean response | noisy copy with every response token [M]; the
    prompt tail that opens the noisy copy follows the same prompt draw; tail tokens past the last
    response block are dropped; targets = the response at its noisy columns."""
    model = load_model("tiny-block")  # block size 4
    m = model.spec.mask_token_id
    prompt_a, prompt_b = [40, 41, 42, 43, 44, 45], [50, 51, 52, 53]
    exs = [Example(prompt_a, [60, 61, 62], [1, 2, 3], tail_ids=[63, 64, 65, 66, 67], tail_steps=[3, 3, 4, 4, 0]),
           Example(prompt_b, [70, 71, 72, 73, 74])]
    alg = d1("policy.options.d1.p_mask_prompt=0.5")
    rows = alg.rows(model, exs, torch.Generator().manual_seed(6), block_size=4, pad_id=None)
    hid_a, hid_b = prompt_draws(6, [6, 4], 0.5)
    assert hid_a.any() and (~hid_a).any() and hid_a[4:].any()  # the draw exercises the prompt tail

    qa = np.where(hid_a, m, prompt_a)
    # a: p = 6, n = 3 -> positions 6..8; the last response block ends at position 11, so the tail
    # keeps 63, 64, 65 and drops 66, 67 (they cannot reach a target).
    want_a = [*qa, 60, 61, 62, 63, 64, 65, *qa[4:], m, m, m, m, m, m]
    seg_a = [PROMPT] * 6 + [CLEAN] * 6 + [NOISY] * 8
    qb = np.where(hid_b, m, prompt_b)
    want_b = [*qb, 70, 71, 72, 73, 74, m, m, m, m, m]
    seg_b = [PROMPT] * 4 + [CLEAN] * 5 + [NOISY] * 5
    width = rows.input_ids.shape[1]
    for r, (ids, seg) in enumerate([(want_a, seg_a), (want_b, seg_b)]):
        pad = width - len(ids)
        assert rows.input_ids[r, pad:].tolist() == [int(x) for x in ids]
        assert rows.segments[r, pad:].tolist() == seg
    assert rows.mask_kind == "two_copy"
    assert rows.target_label.tolist() == [60, 61, 62, 70, 71, 72, 73, 74]
    assert rows.target_index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert all(int(rows.input_ids[r, c]) == m for r, c in zip(rows.target_row, rows.target_col))
    assert all(int(rows.segments[r, c]) == NOISY for r, c in zip(rows.target_row, rows.target_col))
    assert torch.all(rows.target_weight == 1)

    # A new prompt mask on every call (one per ppo_epochs pass); fresh_masks=false: the same one.
    g = torch.Generator().manual_seed(6)
    first, second = (alg.rows(model, exs, g, block_size=4, pad_id=None) for _ in range(2))
    assert not torch.equal(first.input_ids, second.input_ids)
    same = d1("policy.options.d1.p_mask_prompt=0.5", "policy.options.d1.fresh_masks=false")
    g = torch.Generator().manual_seed(6)
    assert torch.equal(same.rows(model, exs, g, block_size=4, pad_id=None).input_ids,
                       same.rows(model, exs, g, block_size=4, pad_id=None).input_ids)
    # p_mask_prompt = 0: the clean prompt (d1's estimator without its regulariser).
    clean = d1("policy.options.d1.p_mask_prompt=0").rows(model, exs, torch.Generator().manual_seed(6),
                                                         block_size=4, pad_id=None)
    assert not (clean.input_ids[clean.segments == PROMPT] == m).any()


@pytest.mark.parametrize("name", ["tiny-full", "tiny-shifted"])
def test_single_copy_rows_are_masked_prompt_then_a_fully_masked_canvas(name):
    model = load_model(name)
    m, shift = model.spec.mask_token_id, model.spec.logit_shift
    prompts = [[40, 41, 42, 43, 44], [50, 51, 52]]
    exs = [Example(prompts[0], [60, 61, 62], [1, 2, 3], tail_ids=[63, 64], tail_steps=[0, 0]),
           Example(prompts[1], [70, 71])]
    rows = d1("policy.options.d1.p_mask_prompt=0.5").rows(model, exs, torch.Generator().manual_seed(3),
                                                          block_size=None, pad_id=None)
    hidden = prompt_draws(3, [5, 3], 0.5)
    assert any(h.any() for h in hidden)
    width = rows.input_ids.shape[1]
    for r, (prompt, canvas) in enumerate([(prompts[0], 5), (prompts[1], 2)]):
        ids = [*np.where(hidden[r], m, prompt), *[m] * canvas]  # the tail is masked too, never a target
        assert rows.input_ids[r, width - len(ids):].tolist() == [int(x) for x in ids]
    assert rows.mask_kind == model.spec.attention
    assert rows.target_label.tolist() == [60, 61, 62, 70, 71]
    pad = [width - 10, width - 5]
    want_cols = [pad[0] + 5 + j - shift for j in range(3)] + [pad[1] + 3 + j - shift for j in range(2)]
    assert rows.target_col.tolist() == want_cols


@pytest.mark.parametrize("name", ["tiny-block", "tiny-full", "tiny-shifted"])
def test_one_step_estimate_is_the_samplers_first_step_log_prob(name):
    """With p_mask_prompt = 0 a d1 row is the state the sampler starts from: every token the
    sampler decoded in its first forward (block family: in the first forward of its block) gets
    exactly the log-prob the sampler recorded; later tokens are the mean-field estimate."""
    model = scrambled(name, dtype=torch.float64)
    stops = tuple(range(100, 180))
    config = SamplingConfig(max_new_tokens=12, block_size=4, steps=2, strategy="static", temperature=1.0,
                            seed=5, stop_token_ids=stops, return_logprobs=True, use_cache=False)
    gens = generate(model, [[65, 66, 67, 68, 69, 70], [71], [80, 81, 82], [90, 91, 92, 93]], config)
    rows = d1("policy.options.d1.p_mask_prompt=0").rows(model, [as_example(g) for g in gens],
                                                        torch.Generator().manual_seed(0), block_size=4,
                                                        pad_id=None)
    with torch.no_grad():
        logp = target_logprobs(model, rows, policy=True)
    assert rows.num_targets == sum(len(g.response_ids) for g in gens)
    first, other = [], []
    for t, (e, j) in enumerate(zip(rows.target_example.tolist(), rows.target_index.tolist())):
        g = gens[e]
        steps = np.asarray(g.step_map + g.tail_steps)
        if model.spec.family == "block":  # the first step of j's block
            blocks = (len(g.prompt_ids) + np.arange(len(steps))) // 4
            in_block = blocks == blocks[j]
            is_first = steps[j] == steps[in_block & (steps > 0)].min()
        else:
            is_first = steps[j] == 1
        (first if is_first else other).append((float(logp[t]), g.logprobs[j]))
    assert len(first) >= 4 and len(other) >= 4
    got, want = np.array(first).T
    np.testing.assert_allclose(got, want, atol=1e-6)
    got, want = np.array(other).T
    assert np.abs(got - want).max() > 1e-3  # later tokens: the estimate, not the sampler's state


# -- a short run ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_short_d1_run_improves_the_training_reward(tmp_path):
    """From a start that answers "Pick i:" right ~5 % of the time (it mostly stops at once), 20
    d1 steps lift the training reward clearly (over 8 seeds of this setup the gain below was
    0.21-0.41; an "always 7" policy scores 0.5).  One thread: the steps are tiny, and several
    threads on a busy 2-core machine mostly wait for each other."""
    from tracerl.recipes.rl import run_rl
    from tracerl.train.metrics import read_metrics

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start, task = picks_seven_or_eight(tmp_path)
        out = tmp_path / "rl"
        run_rl(load_config(RLConfig, None, task + [
            f"output_dir={out}", f"model={start}", "policy.method=d1", "policy.ppo_epochs=4",
            "rollout.num_prompts=8", "rollout.group_size=8", "rollout.sampling.max_new_tokens=4",
            "rollout.sampling.temperature=1.0", "loop.micro_batch=64", "optim.lr=1e-3", "max_steps=20",
            "eval.every=0", "loop.report_to=[none]"]), progress=False)
    finally:
        torch.set_num_threads(threads)
    rows = read_metrics(out / "metrics.jsonl")
    rewards = [r["reward_mean"] for r in rows]
    assert len(rewards) == 20 and all(r["optimizer_updates"] == 4 for r in rows if r["kept_fraction"] > 0)
    assert np.mean(rewards[-5:]) > np.mean(rewards[:3]) + 0.15, rewards
