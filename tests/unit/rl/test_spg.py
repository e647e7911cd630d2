"""SPG (Sandwiched Policy Gradient, arXiv 2510.09541): the loss against a hand computation (values
and gradients, every negative-advantage bound), the block-wise rows of the block, full and shifted
families, the advantages and the refused settings, and a short run that raises the reward."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from tests.support.tiny_models import picks_seven_or_eight

from tracerl.config import load_config
from tracerl.errors import ConfigError
from tracerl.models import load_model
from tracerl.objectives import Example, Rows, target_logprobs
from tracerl.recipes.rl import check_rl_config, run_rl
from tracerl.rl import RLConfig, make_algorithm
from tracerl.rl.algorithms.spg import spg_loss, spg_rows
from tracerl.train.metrics import read_metrics


def _spg(*overrides):
    return make_algorithm(load_config(RLConfig, None, ["policy.method=spg", *overrides]).policy)


# -- a. the loss by hand ---------------------------------------------------------------------------

# Three responses, two mask samples (rows) each; (response, row, token index, weight 1/(m t)).
#   response 0: L=4, A=+1,   samples {1,2,3} (t=3/4: w=2/3) and {3} (t=1/4: w=2)
#   response 1: L=4, A=-0.5, samples {2,3} (t=1/2: w=1) and {3} (w=2): tokens 0, 1 never masked
#   response 2: L=3, A=-1,   samples {0,1,2} (t=1: w=1/2) and {1,2} (t=2/3: w=3/4)
TARGETS = [(0, 0, 1, 2 / 3), (0, 0, 2, 2 / 3), (0, 0, 3, 2 / 3), (0, 1, 3, 2.0),
           (1, 2, 2, 1.0), (1, 2, 3, 1.0), (1, 3, 3, 2.0),
           (2, 4, 0, 0.5), (2, 4, 1, 0.5), (2, 4, 2, 0.5), (2, 5, 1, 0.75), (2, 5, 2, 0.75)]
LOGP = [-0.2, -1.0, -0.5, -0.3, -2.0, -0.7, -1.2, -0.4, -0.9, -1.5, -0.6, -1.1]
ADV = {0: 1.0, 1: -0.5, 2: -1.0}
N = 11.0  # 4 + 4 + 3 response tokens


def _rows(targets, num_examples=3) -> Rows:
    ex, row, idx, w = (torch.tensor([t[k] for t in targets]) for k in range(4))
    r = int(row.max()) + 1
    t = len(targets)
    zeros = torch.zeros(t, dtype=torch.long)
    return Rows(input_ids=torch.zeros(r, 1, dtype=torch.long), position_ids=torch.zeros(r, 1, dtype=torch.long),
                segments=torch.ones(r, 1, dtype=torch.long), mask_kind="full", block_size=4,
                row_example=torch.stack([ex[row == j][0] for j in range(r)]), target_row=row, target_col=zeros,
                target_label=zeros, target_example=ex, target_index=idx, target_step=zeros,
                target_weight=w.float(), num_examples=num_examples)


def _by_hand(lp, negative: str, omega: float, beta: float) -> torch.Tensor:
    """The SPG loss of TARGETS written out term by term."""
    p = lp.exp()
    elbo0 = 0.5 * ((4 / 3) * (lp[0] + lp[1] + lp[2]) + 4 * lp[3])
    elbo1 = 0.5 * (2 * (lp[4] + lp[5]) + 4 * lp[6])
    elbo2 = 0.5 * (1 * (lp[7] + lp[8] + lp[9]) + 1.5 * (lp[10] + lp[11]))
    # EUBO: per token, log of the sample mean of 1{masked} p^β / t, over the tokens masked at
    # least once (K), divided by β and scaled by L / |K|.
    s1 = [0.5 * (p[4] ** beta / 0.5),                            # token 2
          0.5 * (p[5] ** beta / 0.5 + p[6] ** beta / 0.25)]      # token 3
    eubo1 = (4 / 2) * (torch.log(s1[0]) + torch.log(s1[1])) / beta
    s2 = [0.5 * (p[7] ** beta / 1.0),                            # token 0
          0.5 * (p[8] ** beta / 1.0 + p[10] ** beta / (2 / 3)),  # token 1
          0.5 * (p[9] ** beta / 1.0 + p[11] ** beta / (2 / 3))]  # token 2
    eubo2 = (3 / 3) * (torch.log(s2[0]) + torch.log(s2[1]) + torch.log(s2[2])) / beta
    neg = {"mix": lambda e, u: omega * u + (1 - omega) * e, "eubo": lambda e, u: u,
           "elbo": lambda e, u: e, "zero": lambda e, u: 0.0 * e}[negative]
    total = ADV[0] * elbo0 + ADV[1] * neg(elbo1, eubo1) + ADV[2] * neg(elbo2, eubo2)
    return -total / N


@pytest.mark.parametrize("negative,omega,beta", [("mix", 0.5, 1.5), ("mix", 0.3, 2.0), ("eubo", 0.5, 1.0),
                                                 ("elbo", 0.5, 1.5), ("zero", 0.5, 1.5)])
def test_loss_matches_a_hand_computation_in_value_and_gradient(negative, omega, beta):
    rows = _rows(TARGETS)
    adv = torch.tensor([ADV[t[0]] for t in TARGETS], dtype=torch.float64)
    mine = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([t[3] for t in TARGETS], dtype=torch.float64)
    loss, stats = spg_loss(mine, adv, weights=weights, rows=rows, normaliser=N, negative_bound=negative,
                           mix_weight=omega, eubo_beta=beta)
    loss.backward()
    hand_in = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    hand = _by_hand(hand_in, negative, omega, beta)
    hand.backward()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-12, abs=1e-12)
    assert torch.allclose(mine.grad, hand_in.grad, rtol=1e-10, atol=1e-12)
    assert stats["positive_fraction"] == pytest.approx(1 / 3) and "clip_fraction" not in stats


def test_the_loss_ignores_target_order_and_sums_over_micro_batches_of_whole_responses():
    logp = torch.tensor(LOGP, dtype=torch.float64)
    adv = torch.tensor([ADV[t[0]] for t in TARGETS], dtype=torch.float64)
    whole, _ = spg_loss(logp, adv, weights=_rows(TARGETS).target_weight, rows=_rows(TARGETS), normaliser=N)
    order = torch.randperm(len(TARGETS), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = [TARGETS[i] for i in order]
    rows = _rows(shuffled)
    again, _ = spg_loss(logp[order], adv[order], weights=rows.target_weight, rows=rows, normaliser=N)
    parts = 0.0
    for response in range(3):  # one response per call; its rows renumbered from 0
        pick = [i for i, t in enumerate(TARGETS) if t[0] == response]
        first = min(TARGETS[i][1] for i in pick)
        sub = _rows([(t[0], t[1] - first, t[2], t[3]) for t in (TARGETS[i] for i in pick)])
        part, _ = spg_loss(logp[pick], adv[pick], weights=sub.target_weight, rows=sub, normaliser=N)
        parts += part.item()
    assert again.item() == pytest.approx(whole.item(), rel=1e-12)
    assert parts == pytest.approx(whole.item(), rel=1e-12)


def test_the_loss_refuses_weights_that_are_not_spgs():
    rows = _rows(TARGETS)
    bad = rows.target_weight.clone()
    bad[0] = 1.0  # response 0's first sample no longer gives the length its second gives
    with pytest.raises(ValueError, match="not L / \\(m \\|M\\|\\)"):
        spg_loss(torch.tensor(LOGP), torch.ones(len(LOGP)), weights=bad, rows=rows, normaliser=N)


# -- b. rows -----------------------------------------------------------------------------------------

MASK = 259  # the tiny presets' mask token


def _spec(name: str):
    return load_model(name).spec


@pytest.mark.parametrize("name", ["tiny-block", "tiny-full", "tiny-shifted"])
def test_rows_mask_a_part_of_one_block_and_every_later_block(name):
    spec = _spec(name)
    b = 4
    ex0 = Example([65, 66, 67], [70, 71, 72, 73, 74, 75, 76, 77, 78])  # positions 3..11: blocks 0, 1, 2
    ex1 = Example([65, 66], [80, 81, 82, 83, 84], [1, 2, 3, 4, 5], [90, 91, 92], [0, 0, 0])  # a tail
    exs = [ex0, ex1]
    rows = spg_rows(spec, exs, torch.Generator().manual_seed(3), samples=3, prompt_mask=0.0, block_size=b)
    assert rows.num_rows == 6 and rows.row_example.tolist() == [0, 0, 0, 1, 1, 1]
    assert rows.mask_kind == ("two_copy" if spec.family == "block" else spec.attention)
    for i, ex in enumerate(exs):
        p, n = len(ex.prompt_ids), len(ex.response_ids)
        blocks = (p + np.arange(n)) // b
        current = []
        for r in (rows.row_example == i).nonzero().flatten().tolist():
            sel = rows.target_row == r
            idx = rows.target_index[sel].numpy()
            assert sorted(idx) == sorted(set(idx)) and idx.max() < n  # response tokens only, once each
            c = blocks[idx].min()  # the current block: the earliest one with a target
            current.append(int(c))
            in_c = np.flatnonzero(blocks == c)
            assert set(idx) >= set(np.flatnonzero(blocks > c))  # every later token
            assert 1 <= len(set(idx) & set(in_c)) <= len(in_c)
            assert torch.equal(rows.target_label[sel], torch.tensor(ex.response_ids)[idx])
            assert torch.allclose(rows.target_weight[sel], torch.tensor(n / (3 * len(idx))))
            # The model's input: exactly the targets (and the tail) are [M]; the prompt is intact.
            full = rows.input_ids[r][rows.segments[r] != 0].numpy()
            assert full[:p].tolist() == ex.prompt_ids
            if spec.family == "block":
                noisy = full[p + n + len(ex.tail_ids[: (p + n + b - 1) // b * b - (p + n)]) + p % b:]
            else:
                noisy = full[p:]
            state = noisy[:n]
            assert set(np.flatnonzero(state == MASK)) == set(idx)
            assert (noisy[n:] == MASK).all()  # the tail
            if spec.family == "block":  # the clean stream holds the clean response
                assert full[p:p + n].tolist() == ex.response_ids
        # Three samples over the response's blocks: distinct blocks while they last.
        own = np.unique(blocks)
        assert len(set(current)) == min(3, own.size)


def test_rows_draw_every_masked_count_and_are_reproducible():
    spec = _spec("tiny-full")
    ex = Example([65, 66, 67, 68], [70, 71, 72, 73])  # one block of 4 response tokens
    rows = spg_rows(spec, [ex] * 200, torch.Generator().manual_seed(0), samples=1, prompt_mask=0.0, block_size=4)
    counts = torch.bincount(rows.target_row).tolist()
    assert sorted(set(counts)) == [1, 2, 3, 4] and min(counts.count(k) for k in (1, 2, 3, 4)) > 30
    again = spg_rows(spec, [ex] * 200, torch.Generator().manual_seed(0), samples=1, prompt_mask=0.0, block_size=4)
    assert torch.equal(rows.input_ids, again.input_ids) and torch.equal(rows.target_index, again.target_index)
    high = spg_rows(spec, [ex] * 50, torch.Generator().manual_seed(0), samples=1, low=0.5, high=0.75,
                    prompt_mask=0.0, block_size=4)
    assert set(torch.bincount(high.target_row).tolist()) <= {2, 3}


@pytest.mark.parametrize("name", ["tiny-block", "tiny-full"])
def test_prompt_masking_hides_prompt_tokens_only_and_both_copies_agree(name):
    spec = _spec(name)
    ex = Example([65, 66, 67, 68, 69, 70], [80, 81, 82, 83, 84])  # p=6: a prompt tail shares block 1
    rows = spg_rows(spec, [ex] * 40, torch.Generator().manual_seed(1), samples=1, prompt_mask=0.5, block_size=4)
    hidden = 0
    for r in range(rows.num_rows):
        full = rows.input_ids[r][rows.segments[r] != 0].numpy()
        prompt = full[:6]
        assert all(t in (MASK, o) for t, o in zip(prompt, ex.prompt_ids))
        hidden += int((prompt == MASK).sum())
        if spec.family == "block":
            assert full[6:11].tolist() == ex.response_ids  # the clean stream is untouched
            assert (full[11:13] == prompt[4:6]).all()  # the noisy copy's prompt tail: the same draw
    assert 0.3 < hidden / (40 * 6) < 0.7


@pytest.mark.parametrize("name", ["tiny-block", "tiny-full", "tiny-shifted"])
def test_the_algorithm_trains_every_family_and_micro_batches_sum_to_the_batch(name):
    model = load_model(name, dtype=torch.float64)
    algorithm = _spg()
    exs = [Example([65, 66, 67], [70, 71, 72, 73, 74, 256]), Example([65, 66], [80, 81, 256]),
           Example([65, 66, 67], [75, 76, 77, 256])]
    rows = algorithm.rows(model, exs, torch.Generator().manual_seed(0), block_size=None, pad_id=None)
    assert rows.num_rows == 2 * 3  # mask_samples = 2 by default
    adv = torch.tensor([0.5, -0.25, -0.25])
    n = sum(len(e.response_ids) for e in exs)
    logp = target_logprobs(model, rows, policy=True)
    loss, stats = algorithm.loss(logp, logp.detach(), adv[rows.target_example], normaliser=n, ref_logprobs=None,
                                 weights=rows.target_weight, rows=rows)
    loss.backward()
    assert torch.isfinite(loss) and stats["approx_kl"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["eubo_per_token"] > stats["elbo_per_token_negative"] - 5  # both finite
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    total = 0.0
    for i in range(3):
        sub = rows.select_examples([i])
        lp = target_logprobs(model, sub, policy=True)
        part, _ = algorithm.loss(lp, lp, adv[sub.target_example], normaliser=n, ref_logprobs=None,
                                 weights=sub.target_weight, rows=sub)
        total += part.item()
    assert total == pytest.approx(loss.item(), rel=1e-9)


# -- advantages, options, refused settings ------------------------------------------------------------


def test_advantages_are_centred_without_std_unless_asked():
    rewards, groups = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]), [0, 0, 0, 1, 1, 1]
    adv, keep = _spg().advantages(rewards, groups, rewards.bool())
    assert torch.allclose(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]))
    assert keep.all()
    z, _ = _spg("policy.options.spg.std_normalise=true").advantages(rewards, groups, rewards.bool())
    assert torch.allclose(z[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]) / (2 ** 0.5 / 3))
    adv, keep = _spg().advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), [0, 0, 1, 1], None)
    assert adv[:2].tolist() == [0.0, 0.0] and keep.tolist() == [False, False, True, True]


def test_defaults_and_option_errors_name_the_key():
    o = _spg().options
    assert (o.negative_bound, o.mix_weight, o.eubo_beta, o.mask_samples, o.prompt_mask) == ("mix", 0.5, 1.5, 2, 0.15)
    for key, value, words in [("eubo_beta", 0.5, "eubo_beta: need a finite beta >= 1"),
                              ("mix_weight", 1.5, "mix_weight: need 0 <= mix_weight <= 1"),
                              ("negative_bound", "upper", "negative_bound: 'upper'; valid: mix, eubo, elbo, zero"),
                              ("mask_samples", 0, "mask_samples: must be an integer >= 1"),
                              ("mask_high", 1.5, "mask_low, mask_high: need 0 <= mask_low <= mask_high <= 1"),
                              ("prompt_mask", 1.0, "prompt_mask: need 0 <= prompt_mask < 1")]:
        with pytest.raises(ConfigError, match=r"policy\.options\.spg(\.|: )" + re.escape(words)):
            _spg(f"policy.options.spg.{key}={value}")


@pytest.mark.parametrize("override,key", [("policy.rows_per_forward=2", "policy.rows_per_forward"),
                                          ("policy.beta=0.04", "policy.beta")])
def test_settings_that_would_break_the_bound_are_refused_before_any_work(override, key):
    config = load_config(RLConfig, None, ["policy.method=spg", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_rl_config(config, load_model("tiny-full"))


# -- c. a short run -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_spg_runs_through_the_rl_loop_on_the_block_family(tmp_path):
    """Two passes (fresh masks each) over a random tiny-block model's responses: the loop's rows,
    old log-probs and loss calls fit together; SPG reports no clip fraction."""
    task = ["task.source=gym", "task.name=basic_arithmetic", "task.size=16", "task.template=raw", "task.chat=false",
            'task.params={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1, operators: ["+"], '
            "allow_parentheses: false, allow_negation: false}"]
    out = tmp_path / "run"
    run_rl(load_config(RLConfig, None, task + [
        f"output_dir={out}", "model=tiny-block", "policy.method=spg", "policy.filter_equal=false", "max_steps=1",
        "policy.ppo_epochs=2", "rollout.num_prompts=2", "rollout.group_size=2", "rollout.sampling.max_new_tokens=6",
        "loop.micro_batch=2", "optim.lr=1e-3", "eval.every=0"]), progress=False)
    row = read_metrics(out / "metrics.jsonl")[0]
    assert row["optimizer_updates"] == 4 and np.isfinite(row["policy_loss"]) and "clip_fraction" not in row
    assert row["kl"] >= 0.0


@pytest.mark.slow
def test_a_short_spg_run_raises_the_training_reward(tmp_path):
    # 30 SFT steps: the default 15 leave the start right on ~6% of samples (mostly an immediate stop),
    # so most groups would have no signal.  No prompt masking: the answer hinges on one prompt digit.
    start, task = picks_seven_or_eight(tmp_path, steps=30)
    out = tmp_path / "spg"
    run_rl(load_config(RLConfig, None, task + [
        f"output_dir={out}", f"model={start}", "policy.method=spg", "policy.options.spg.prompt_mask=0",
        "max_steps=30", "rollout.num_prompts=8", "rollout.group_size=16", "rollout.sampling.max_new_tokens=4",
        "rollout.sampling.temperature=1.0", "loop.micro_batch=128", "optim.lr=1e-3", "eval.every=0"]), progress=False)
    rewards = [r["reward_mean"] for r in read_metrics(out / "metrics.jsonl")]
    assert len(rewards) == 30
    # Seeds 0-5 of this setup: the first five steps average ~0.2, the last five 0.34-0.49.
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.1, rewards
