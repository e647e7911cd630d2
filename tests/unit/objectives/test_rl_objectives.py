"""RL objective pieces: rows, group advantages, PPO-clip + k3 policy loss and its normalisers,
value model (zero head, gather, one step, save/load), GAE over trace steps, clipped value loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support.tiny_models import scrambled
from tracerl.errors import CheckpointError, ConfigError
from tracerl.generation import SamplingConfig, generate
from tracerl.models import load_model
from tracerl.objectives import Example, as_example, block_sft_rows, build_trace_rows, target_logprobs
from tracerl.objectives.rl import (
    group_advantages,
    k3,
    policy_loss,
    rl_normaliser,
    rl_rows,
)
from tracerl.objectives.sft import random_masking_rows
from tracerl.objectives.value import ValueModel, gae_over_steps, gae_targets, value_loss


@pytest.fixture(scope="module")
def block_model():
    return scrambled("tiny-block", dtype=torch.float64)


@pytest.fixture(scope="module")
def examples(block_model):
    """Real sampler traces (dynamic unmasking: tokens share steps; prompts not multiples of the
    block size) plus a hand-made one."""
    config = SamplingConfig(max_new_tokens=11, steps=2, strategy="dynamic", threshold=0.5,
                            temperature=1.0, seed=3, stop_token_ids=())
    gens = generate(block_model, [[65, 66, 67, 68, 69, 70], [71], [80, 81, 82]], config)
    assert any(len(set(g.step_map)) < len(g.step_map) for g in gens)
    hand = Example([10, 11, 12, 13, 14], list(range(20, 30)), [2, 1, 2, 4, 3, 3, 5, 7, 6, 7])
    return [as_example(g) for g in gens] + [hand]


def grads(model):
    return [p.grad.detach().clone() for p in model.backbone.parameters() if p.grad is not None]


def token_set(rows, sel=None):
    sel = torch.ones(rows.num_targets, dtype=torch.bool) if sel is None else sel
    return sorted(zip(rows.target_example[sel].tolist(), rows.target_index[sel].tolist()))


# -- policy loss ---------------------------------------------------------------------------------


def test_first_micro_batch_ratio_one_and_gradient_is_minus_a_grad_logp(block_model, examples):
    """logp == old: ratio 1, nothing clipped, KL 0 (value and gradient), and the gradient of the
    loss equals that of the independent formula −Σ A_j w_j logp_j / N, on a real model."""
    model = block_model
    rows = rl_rows("tracerl", model.spec, examples)
    adv_per_example = torch.tensor([1.3, -0.7, 0.0, 2.1], dtype=torch.float64)
    adv = adv_per_example[rows.target_example]
    n = rl_normaliser("token_mean", examples)
    assert n == sum(len(ex.response_ids) for ex in examples)

    model.backbone.zero_grad()
    logp = target_logprobs(model, rows)
    old = logp.detach().clone()
    loss, stats = policy_loss(logp, old, adv, normaliser=n, beta=0.3, weights=rows.target_weight)
    loss.backward()
    got = grads(model)
    assert stats["ratio_mean"] == 1.0 and stats["clip_fraction"] == 0.0
    assert stats["approx_kl"] == 0.0 and stats["ref_kl"] == 0.0 and stats["kl_loss"] == 0.0
    assert stats["adv_mean"] == pytest.approx(float(adv.mean()))

    model.backbone.zero_grad()
    logp2 = target_logprobs(model, rows)
    reference = -(adv * logp2).sum() / n
    reference.backward()
    want = grads(model)
    assert len(got) == len(want) > 0
    assert float(loss.detach()) == pytest.approx(-float(adv.sum()) / n, rel=1e-12)
    assert max(float(g.abs().max()) for g in got) > 0  # a real, non-zero gradient
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    model.backbone.zero_grad()


def test_clipping_engages_exactly_outside_the_band_by_sign_of_advantage():
    eps = 0.2
    ratios = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.19, 1.21, 2.0], dtype=torch.float64)
    old = torch.full((7,), -1.5, dtype=torch.float64)
    for sign, expect_clipped in ((1.0, [False, False, False, False, False, True, True]),
                                 (-1.0, [True, True, False, False, False, False, False])):
        logp = (old + ratios.log()).requires_grad_(True)
        adv = torch.full((7,), 0.8 * sign, dtype=torch.float64)
        loss, stats = policy_loss(logp, old, adv, normaliser=7.0, eps=eps)
        loss.backward()
        clipped = torch.tensor(expect_clipped)
        # d/dlogp of −ρA/N is −ρA/N where unclipped, 0 where clipped
        want = torch.where(clipped, torch.zeros(7, dtype=torch.float64), -ratios * adv / 7)
        torch.testing.assert_close(logp.grad, want, rtol=1e-12, atol=0)
        assert stats["clip_fraction"] == pytest.approx(2 / 7)
        # value: the textbook min(ρA, clip(ρ)A) formula
        textbook = -torch.min(ratios * adv, ratios.clamp(1 - eps, 1 + eps) * adv).sum() / 7
        assert float(loss.detach()) == pytest.approx(float(textbook), rel=1e-12)
        assert stats["ratio_mean"] == pytest.approx(float(ratios.mean()))
    # A = 0: no gradient, nothing counted as clipped
    logp = (old + ratios.log()).requires_grad_(True)
    loss, stats = policy_loss(logp, old, torch.zeros(7, dtype=torch.float64), normaliser=7.0)
    loss.backward()
    assert torch.all(logp.grad == 0) and stats["clip_fraction"] == 0.0


def test_log_ratio_clamp_bounds_the_ratio():
    old = torch.zeros(2, dtype=torch.float64)
    logp = torch.tensor([30.0, 3.0], dtype=torch.float64, requires_grad=True)
    loss, stats = policy_loss(logp, old, torch.tensor([-1.0, -1.0], dtype=torch.float64),
                              normaliser=1.0, logratio_clamp=10.0)
    loss.backward()
    # A < 0, ρ > 1+ε: unclipped; token 0's ratio is exp(10) (clamped) with no gradient
    assert float(loss.detach()) == pytest.approx(np.exp(10.0) + np.exp(3.0))
    assert logp.grad[0] == 0 and logp.grad[1] == pytest.approx(np.exp(3.0))


def test_k3_zero_iff_policies_agree_and_penalty_gradient():
    a = torch.tensor([-0.1, -2.0, -5.0], dtype=torch.float64)
    assert torch.all(k3(a, a) == 0)
    for b in (a + 0.5, a - 0.5, a + torch.tensor([1.0, -3.0, 0.01], dtype=torch.float64)):
        assert torch.all(k3(a, b) > 0)
    # the penalty term against a separate reference: β·Σ k3 / N with the k3 gradient 1 − e^(ref−logp)
    ref = a - torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64)
    logp = a.clone().requires_grad_(True)
    beta, n = 0.05, 4.0
    loss, stats = policy_loss(logp, a, torch.zeros(3, dtype=torch.float64), normaliser=n,
                              beta=beta, ref_logprobs=ref)
    loss.backward()
    d = ref - a
    want_k3 = d.exp() - 1 - d
    assert float(loss.detach()) == pytest.approx(beta * float(want_k3.sum()) / n, rel=1e-12)
    torch.testing.assert_close(logp.grad, beta * (1 - d.exp()) / n, rtol=1e-12, atol=0)
    assert stats["ref_kl"] == pytest.approx(float(want_k3.mean())) and stats["approx_kl"] == 0.0


def test_normalisations_and_micro_batch_invariance(block_model, examples):
    model = block_model
    rows = rl_rows("tracerl", model.spec, examples)
    adv = torch.tensor([0.5, -1.0, 1.5, -0.25], dtype=torch.float64)[rows.target_example]
    with torch.no_grad():
        old = target_logprobs(model, rows)
    logp = old + 0.3 * torch.sin(torch.arange(rows.num_targets, dtype=torch.float64))
    # upstream: per row Σ_T(...)/L1, averaged over rows
    l1 = max(len(ex.response_ids) for ex in examples)
    n_up = rl_normaliser("upstream", examples, num_rows=rows.num_rows)
    assert n_up == l1 * rows.num_rows
    assert rl_normaliser("upstream", examples, num_rows=3, response_length=40) == 120
    ratio = (logp - old).exp()
    per_token = torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    per_row = torch.zeros(rows.num_rows, dtype=torch.float64).index_add_(0, rows.target_row, per_token)
    loss_up, _ = policy_loss(logp, old, adv, normaliser=n_up)
    assert float(loss_up) == pytest.approx(-float((per_row / l1).mean()), rel=1e-12)
    # token_mean: Σ over all tokens / number of response tokens
    n_tok = rl_normaliser("token_mean", examples)
    loss_tok, _ = policy_loss(logp, old, adv, normaliser=n_tok)
    assert float(loss_tok) == pytest.approx(-float(per_token.sum()) / n_tok, rel=1e-12)
    # micro-batches with the optimizer batch's N sum to the full-batch loss
    total = 0.0
    for start in range(0, rows.num_rows, 2):
        sel = (rows.target_row >= start) & (rows.target_row < start + 2)
        part, _ = policy_loss(logp[sel], old[sel], adv[sel], normaliser=n_tok, beta=0.1)
        total += float(part)
    full, _ = policy_loss(logp, old, adv, normaliser=n_tok, beta=0.1)
    assert total == pytest.approx(float(full), rel=1e-12)
    with pytest.raises(ConfigError, match="normalisation"):
        rl_normaliser("per_row", examples)
    with pytest.raises(ConfigError, match="num_rows"):
        rl_normaliser("upstream", examples)


# -- group advantages ----------------------------------------------------------------------------


def test_group_advantages_z_score_equal_groups_and_alignment():
    # interleaved groups; group 7 all equal; group 3 has a non-binary spread
    rewards = [1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 0.5, 2.0, 0.5, 1.0]
    groups = [3, 5, 7, 3, 5, 3, 7, 3, 7, 5]
    adv, keep = group_advantages(rewards, groups)
    r, g = np.asarray(rewards), np.asarray(groups)
    for gid in (3, 5):
        sel = g == gid
        z = (r[sel] - r[sel].mean()) / r[sel].std(ddof=0)
        np.testing.assert_allclose(adv.numpy()[sel], z, rtol=1e-6)
    assert torch.all(adv[torch.tensor(g == 7)] == 0)
    assert keep.tolist() == [gid != 7 for gid in groups]
    # hand values: group 5 = {0, 0, 1}: mean 1/3, std sqrt(2)/3
    assert adv[9].item() == pytest.approx((2 / 3) / (np.sqrt(2) / 3), rel=1e-6)
    # not filtering keeps the equal group (still 0)
    adv2, keep2 = group_advantages(rewards, groups, filter_equal=False)
    assert torch.equal(adv2, adv) and bool(keep2.all())
    # rounding-prone equal rewards are still exactly 0, not ±1 from a tiny float std
    adv3, keep3 = group_advantages([0.1] * 3 + [0.3, 0.7], ["a"] * 3 + ["b"] * 2)
    assert torch.all(adv3[:3] == 0) and keep3.tolist() == [False] * 3 + [True] * 2
    assert adv3[3:].tolist() == pytest.approx([-1.0, 1.0])


def test_group_advantages_accuracy_band():
    # 5 responses per group: accuracies 0.0, 0.2, 0.6, 0.8, 1.0 (groups interleaved)
    correct = {0: [0] * 5, 1: [1, 0, 0, 0, 0], 2: [1, 1, 0, 1, 0], 3: [1, 1, 1, 1, 0], 4: [1] * 5}
    order = [(gid, i) for i in range(5) for gid in (4, 2, 0, 3, 1)]
    groups = [gid for gid, _ in order]
    c = [correct[gid][i] for gid, i in order]
    adv, keep = group_advantages(c, groups, accuracy_band=(0.2, 0.8))
    assert keep.tolist() == [gid in (1, 2, 3) for gid in groups]
    adv_all, _ = group_advantages(c, groups, filter_equal=False)
    assert torch.equal(adv, adv_all)  # dropping never moves or changes a response's advantage
    # band on an explicit correctness vector, rewards on another scale (e.g. tests passed)
    rewards = [3 * x + 1 for x in c]
    _, keep2 = group_advantages(rewards, groups, accuracy_band=(0.5, 0.7), correct=c)
    assert keep2.tolist() == [gid == 2 for gid in groups]
    with pytest.raises(ConfigError, match="correct"):
        group_advantages(rewards, groups, accuracy_band=(0.2, 0.8))
    with pytest.raises(ValueError, match="same length"):
        group_advantages([1.0, 0.0], [0])


# -- rows ----------------------------------------------------------------------------------------


def test_rl_rows_tracerl_every_token_once(block_model, examples):
    rows = rl_rows("tracerl", block_model.spec, examples, shrink=1)
    assert rows.mask_kind == "two_copy"
    assert token_set(rows) == [(i, j) for i, ex in enumerate(examples)
                               for j in range(len(ex.response_ids))]
    assert torch.all(rows.target_weight == 1)
    ref = build_trace_rows(block_model.spec, examples, shrink=2)
    rows2 = rl_rows("tracerl", block_model.spec, examples, shrink=2)
    assert torch.equal(rows2.input_ids, ref.input_ids) and torch.equal(rows2.target_col, ref.target_col)
    assert rows2.num_rows < rows.num_rows


@pytest.mark.parametrize("family", ["block", "full", "shifted"])
def test_coupled_rows_cover_every_token_once_per_pair(family, examples):
    spec = load_model(f"tiny-{family}").spec
    everything = [(i, j) for i, ex in enumerate(examples) for j in range(len(ex.response_ids))]
    rows = rl_rows("coupled", spec, examples, torch.Generator().manual_seed(0))
    assert token_set(rows) == everything  # union of each pair = all tokens, pairs disjoint
    assert torch.all(rows.target_weight == 1)
    masked = rows.input_ids[rows.target_row, rows.target_col + spec.logit_shift]
    assert torch.all(masked == spec.mask_token_id)
    # two samples: every token exactly twice, total weight 1
    rows2 = rl_rows("coupled", spec, examples, torch.Generator().manual_seed(0), mask_samples=2)
    assert token_set(rows2) == sorted(everything * 2)
    assert torch.all(rows2.target_weight == 0.5)
    # a coupled pair is two rows of the same example whose target sets partition the response
    for e in range(len(examples)):
        r = (rows.row_example == e).nonzero().flatten().tolist()
        assert len(r) in (1, 2)  # 1 when one side of the draw masked nothing


def test_random_masking_rows_reuse_the_sft_noise(block_model, examples):
    spec = block_model.spec
    rows = rl_rows("random_masking", spec, examples, torch.Generator().manual_seed(5))
    sft = block_sft_rows(spec, examples, torch.Generator().manual_seed(5))
    assert torch.equal(rows.input_ids, sft.input_ids) and token_set(rows) == token_set(sft)
    assert torch.all(rows.target_weight == 1) and not torch.all(sft.target_weight == 1)
    full = load_model("tiny-full").spec
    rows = rl_rows("random_masking", full, examples, torch.Generator().manual_seed(5), mask_samples=3,
                   low=0.3, high=0.6)
    sft = random_masking_rows(full, examples, torch.Generator().manual_seed(5), samples=3,
                              low=0.3, high=0.6)
    assert torch.equal(rows.input_ids, sft.input_ids) and token_set(rows) == token_set(sft)
    assert torch.allclose(rows.target_weight, torch.full_like(rows.target_weight, 1 / 3))
    assert int((rows.row_example == 0).sum()) == 3


def test_rl_rows_errors(block_model, examples):
    spec = block_model.spec
    with pytest.raises(ConfigError, match="valid: tracerl, random_masking, coupled"):
        rl_rows("grpo", spec, examples)
    with pytest.raises(ConfigError, match="Generator"):
        rl_rows("coupled", spec, examples)
    with pytest.raises(ConfigError, match="mask_samples"):
        rl_rows("random_masking", spec, examples, torch.Generator(), mask_samples=0)
    with pytest.raises(ConfigError, match="complement"):
        rl_rows("coupled", spec, examples, torch.Generator(), high=1.0)


# -- GAE -----------------------------------------------------------------------------------------

# Hand example: 5 tokens, steps with ties, in token order [3, 1, 3, 7, 1].
#   steps sorted: 1 (j1, j4), 3 (j0, j2), 7 (j3); V* = [0.25, 0.4, 0.2]; outcome R = 1 on j3.
V = torch.tensor([0.5, 0.1, 0.3, 0.2, 0.4], dtype=torch.float64)
STEPS = [3, 1, 3, 7, 1]


def test_gae_gamma_lambda_one_is_r_minus_v():
    ret, adv = gae_over_steps(1.0, V, STEPS, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(adv, 1.0 - V, rtol=0, atol=1e-12)
    # random values and steps too
    g = torch.Generator().manual_seed(0)
    v = torch.randn(40, generator=g, dtype=torch.float64)
    s = torch.randint(1, 15, (40,), generator=g)
    ret, adv = gae_over_steps(-0.7, v, s)
    torch.testing.assert_close(ret, torch.full((40,), -0.7, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(adv, -0.7 - v, rtol=0, atol=1e-12)


def test_gae_hand_computed_lambda_zero_and_half():
    # λ = 0: A_j = r_j − V_j + γ V*_{k+1}; Return_j = r_j + γ R*_{k+1}, R* = [0.81, 0.9, 1]
    ret, adv = gae_over_steps(1.0, V, STEPS, gamma=0.9, lam=0.0)
    assert adv.tolist() == pytest.approx([-0.5 + 0.9 * 0.2, -0.1 + 0.9 * 0.4, -0.3 + 0.9 * 0.2,
                                          1.0 - 0.2, -0.4 + 0.9 * 0.4])
    assert ret.tolist() == pytest.approx([0.9, 0.81, 0.9, 1.0, 0.81])
    # λ = 0.5: A*_3 = 0.8, A*_2 = −0.4 + 0.9·0.2 + 0.45·0.8 = 0.14
    _, adv = gae_over_steps(1.0, V, STEPS, gamma=0.9, lam=0.5)
    a_step3 = 0.8
    a_step2 = -0.4 + 0.9 * 0.2 + 0.45 * a_step3
    assert adv.tolist() == pytest.approx([
        -0.5 + 0.9 * 0.2 + 0.45 * a_step3,
        -0.1 + 0.9 * 0.4 + 0.45 * a_step2,
        -0.3 + 0.9 * 0.2 + 0.45 * a_step3,
        1.0 - 0.2,
        -0.4 + 0.9 * 0.4 + 0.45 * a_step2,
    ])
    # the outcome reward as an explicit token-reward vector gives the same
    r = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    ret2, adv2 = gae_over_steps(r, V, STEPS, gamma=0.9, lam=0.5)
    assert adv2.tolist() == pytest.approx(adv.tolist())
    # process rewards: step means are used for the later steps' bootstraps
    r = torch.tensor([0.2, 0.0, 0.4, 1.0, 0.6], dtype=torch.float64)
    ret3, _ = gae_over_steps(r, V, STEPS, gamma=1.0, lam=1.0)
    # R*_3 = 1, R*_2 = 0.3 + 1, R*_1 = 0.3 + 1.3
    assert ret3.tolist() == pytest.approx([0.2 + 1.0, 0.0 + 1.3, 0.4 + 1.0, 1.0, 0.6 + 1.3])


def test_gae_targets_align_with_rows(block_model, examples):
    rows = rl_rows("tracerl", block_model.spec, examples)
    values = torch.linspace(-1, 1, rows.num_targets)
    rewards = torch.tensor([1.0, -1.0, 0.5, 2.0])
    ret, adv = gae_targets(rows, values, rewards)
    torch.testing.assert_close(ret, rewards[rows.target_example], rtol=0, atol=1e-6)
    torch.testing.assert_close(adv, rewards[rows.target_example] - values, rtol=0, atol=1e-6)
    # λ = 0: every token's advantage uses the next step's mean value of its own response
    ret, adv = gae_targets(rows, values, rewards, gamma=1.0, lam=0.0)
    for e in range(len(examples)):
        sel = rows.target_example == e
        _, want = gae_over_steps(rewards[e], values[sel], rows.target_step[sel], lam=0.0)
        torch.testing.assert_close(adv[sel], want)
    with pytest.raises(ValueError, match="exactly once"):
        coupled = rl_rows("random_masking", block_model.spec, examples, torch.Generator())
        gae_targets(coupled, torch.zeros(coupled.num_targets), rewards)


# -- value model and value loss ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_block():
    return load_model("tiny-block")  # float32, as trained


@pytest.mark.parametrize("share", [False, True])
def test_value_model_starts_at_zero_and_one_step_moves_toward_returns(tiny_block, examples, share):
    policy = tiny_block
    before = [p.detach().clone() for p in policy.backbone.parameters()]
    vm = ValueModel(policy, share_backbone=share)
    names = [n for n, _ in vm.named_parameters()]
    if share:
        assert names == ["value_head.weight"] and vm.backbone_lm is policy
    else:
        assert "value_head.weight" in names and len(names) > 1
        assert vm.lm.backbone is not policy.backbone
    rows = rl_rows("tracerl", vm.spec, examples)
    v0 = vm.values(rows)
    assert v0.shape == (rows.num_targets,) and v0.dtype == torch.float32
    assert torch.all(v0 == 0)  # exactly zero, not merely small
    rewards = torch.tensor([1.0, -1.0, 0.5, 2.0])
    returns, adv = gae_targets(rows, v0, rewards)
    torch.testing.assert_close(adv, rewards[rows.target_example])  # A = R − 0
    n = rl_normaliser("token_mean", examples)
    opt = torch.optim.SGD(vm.parameters(), lr=0.05)
    loss, stats = value_loss(vm.values(rows), v0, returns, normaliser=n, eps=0.2)
    assert stats["loss"] == pytest.approx(0.5 * float((returns ** 2).sum()) / n)
    loss.backward()
    assert vm.value_head.weight.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        v1 = vm.values(rows)
    assert not torch.all(v1 == 0)
    assert float(((v1 - returns) ** 2).mean()) < float((returns ** 2).mean())
    assert float((v1 * returns).sum()) > 0
    if share:
        policy.backbone.zero_grad()
    # the policy weights never moved
    for a, b in zip(before, policy.backbone.parameters()):
        assert torch.equal(a, b)


def test_value_gather_matches_logits_and_shared_forward(tiny_block, examples):
    """The value of a target is read at its target column: with the head set to the LM-head row
    of a token u, values equal the full forward's logit of u at the target positions."""
    model = tiny_block
    rows = rl_rows("tracerl", model.spec, examples)
    vm = ValueModel(model, share_backbone=True)
    u = 42
    with torch.no_grad():
        vm.value_head.weight.copy_(model.backbone.get_output_embeddings().weight[u][None])
        logits = model(rows.input_ids, attention_mask=rows.attention_mask,
                       position_ids=rows.position_ids)
        want = logits[rows.target_row, rows.target_col, u]
        torch.testing.assert_close(vm.values(rows), want, rtol=1e-5, atol=1e-5)
        logp, values = vm.policy_and_values(rows)
        torch.testing.assert_close(logp, target_logprobs(model, rows), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(values, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="share_backbone"):
        ValueModel(model).policy_and_values(rows)


def test_value_loss_clipping_by_hand():
    old = torch.zeros(3, dtype=torch.float64)
    returns = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    v = torch.tensor([0.5, 0.1, -0.5], dtype=torch.float64, requires_grad=True)
    loss, stats = value_loss(v, old, returns, normaliser=2.0, eps=0.2)
    loss.backward()
    # j0: unclipped 0.25, clipped (0.2−1)² = 0.64 → 0.64, no gradient (clamp saturated)
    # j1: inside the band: 0.81, gradient V − R = −0.9
    # j2: unclipped 2.25, clipped (−0.2−1)² = 1.44 → 2.25, gradient V − R = −1.5
    assert float(loss.detach()) == pytest.approx(0.5 * (0.64 + 0.81 + 2.25) / 2)
    torch.testing.assert_close(v.grad, torch.tensor([0.0, -0.9, -1.5], dtype=torch.float64) / 2)
    assert stats["clip_fraction"] == pytest.approx(1 / 3)
    v = v.detach().requires_grad_(True)
    loss, stats = value_loss(v, old, returns, normaliser=2.0, eps=None)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.5 * (0.25 + 0.81 + 2.25) / 2) and stats["clip_fraction"] == 0
    torch.testing.assert_close(v.grad, (v.detach() - returns) / 2)
    # the band is around V_old, not around 0: V_old = 0.5, V = 1.0 → V_clip = 0.7
    v = torch.tensor([1.0, 0.6], dtype=torch.float64, requires_grad=True)
    loss, stats = value_loss(v, torch.tensor([0.5, 0.5], dtype=torch.float64),
                             torch.tensor([2.0, 2.0], dtype=torch.float64), normaliser=1.0, eps=0.2)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.5 * ((0.7 - 2.0) ** 2 + (0.6 - 2.0) ** 2))
    torch.testing.assert_close(v.grad, torch.tensor([0.0, 0.6 - 2.0], dtype=torch.float64))
    assert stats["clip_fraction"] == 0.5


def test_value_head_save_load_roundtrip(tiny_block, examples, tmp_path):
    rows = rl_rows("tracerl", tiny_block.spec, examples)
    g = torch.Generator().manual_seed(0)
    for share in (False, True):
        vm = ValueModel(tiny_block, share_backbone=share)
        with torch.no_grad():
            vm.value_head.weight.copy_(torch.randn(vm.value_head.weight.shape, generator=g))
            if not share:  # the copy diverges from the policy: that must be saved too
                next(vm.lm.backbone.parameters()).mul_(1.5)
            want = vm.values(rows)
        folder = tmp_path / f"value-{share}"
        vm.save_pretrained(folder)
        assert (folder / "value_head.safetensors").is_file()
        assert (folder / "config.json").is_file() != share
        back = ValueModel.from_pretrained(folder, tiny_block, share_backbone=share)
        with torch.no_grad():
            torch.testing.assert_close(back.values(rows), want, rtol=0, atol=0)
    # a head of the wrong width is refused with the file named
    other = ValueModel(load_model("tiny-full"), share_backbone=True)
    other.value_head = torch.nn.Linear(64, 1, bias=False)
    other.save_head(tmp_path / "bad")
    with pytest.raises(CheckpointError, match="value_head.safetensors"):
        ValueModel.from_pretrained(tmp_path / "bad", tiny_block, share_backbone=True)


# -- training states are the sampler's states --------------------------------------------------


@pytest.mark.parametrize("name,max_new", [("tiny-block", 12), ("tiny-full", 12), ("tiny-shifted", 12)])
def test_trace_rows_reproduce_the_samplers_logprobs_with_stops_mid_block(name, max_new):
    """At temperature 1 (no top-k/p) the sampler records log p(token | its state); the TraceRL
    rows must give exactly those log-probs.  Many stop ids make responses end inside a block, so
    the tokens the sampler decoded after the stop (and, with full attention, the still-masked
    later blocks) must be in the rows as context: without the tail the states differ."""
    model = scrambled(name, dtype=torch.float64)
    stops = tuple(range(100, 180))  # ~30 % of the vocabulary: most responses stop early
    config = SamplingConfig(max_new_tokens=max_new, block_size=4, steps=4, strategy="static",
                            temperature=1.0, seed=5, stop_token_ids=stops, return_logprobs=True,
                            use_cache=False)
    prompts = [[65, 66, 67, 68, 69, 70], [71], [80, 81, 82], [90, 91, 92, 93], [33] * 9, [40, 41]]
    gens = generate(model, prompts, config)
    mid = [g for g in gens if g.finish_reason == "stop" and g.tail_ids]
    assert len(mid) >= 2, "the test needs responses that stop inside a block"
    if model.spec.attention == "full":
        assert any(0 in g.tail_steps for g in mid)  # never-decoded later blocks are part of the tail
    for g in gens:
        end = len(g.prompt_ids) + len(g.response_ids) + len(g.tail_ids)
        assert g.finish_reason == "length" or end - len(g.prompt_ids) <= max_new
    rows = build_trace_rows(model.spec, gens, block_size=4)
    with torch.no_grad():
        logp = target_logprobs(model, rows, policy=True)
    want = torch.tensor([gens[e].logprobs[j] for e, j in zip(rows.target_example.tolist(),
                                                               rows.target_index.tolist())],
                        dtype=torch.float64)
    assert rows.num_targets == sum(len(g.response_ids) for g in gens)
    torch.testing.assert_close(logp, want, atol=1e-5, rtol=0)
    # Without the tail, the states of the stop blocks differ (this is what the tail fixes).
    bare = [Example(g.prompt_ids, g.response_ids, g.step_map) for g in gens]
    with torch.no_grad():
        bare_logp = target_logprobs(model, build_trace_rows(model.spec, bare, block_size=4), policy=True)
    assert (bare_logp - want).abs().max() > 1e-3
