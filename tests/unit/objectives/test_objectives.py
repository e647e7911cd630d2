"""Objectives: trace rows (hand-written), one-pass == step-by-step replay, SFT noise and weights,
micro-batch invariance of the loss, AR SFT == transformers' causal-LM loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support.tiny_models import scrambled
from tracerl import masks
from tracerl.errors import ConfigError
from tracerl.generation import SamplingConfig, generate
from tracerl.masks import CLEAN, NOISY, PAD, PROMPT
from tracerl.models import load_model
from tracerl.objectives import (
    Example,
    ar_rows,
    as_example,
    block_sft_rows,
    build_sft_rows,
    build_trace_rows,
    count_response_tokens,
    random_masking_rows,
    semi_ar_rows,
    sft_loss,
    shrink_steps,
    target_logprobs,
    trace_sft_rows,
)

ATOL = 1e-5


@pytest.fixture(scope="module")
def block_model():
    return scrambled("tiny-block", dtype=torch.float64)


@pytest.fixture(scope="module")
def full_model():
    return scrambled("tiny-full", dtype=torch.float64)


@pytest.fixture(scope="module")
def shifted_model():
    return scrambled("tiny-shifted", dtype=torch.float64)


# The hand-written trace: prompt 5 tokens, block size 4, response 10 tokens.
#   absolute positions 5..14 -> blocks: j0-2 -> block 1 (shares it with prompt token 4, partial),
#   j3-6 -> block 2, j7-9 -> block 3 (positions 12-14: partial last block).
PROMPT_IDS = [10, 11, 12, 13, 14]
RESPONSE_IDS = list(range(20, 30))
STEP_MAP = [2, 1, 2, 4, 3, 3, 5, 7, 6, 7]  # ties in every block
HAND = Example(PROMPT_IDS, RESPONSE_IDS, STEP_MAP)


def targets_by_row(rows, r):
    sel = rows.target_row == r
    return sorted(rows.target_index[sel].tolist())


def noisy_copy(rows, r):
    """The noisy copy of two-copy row r of HAND (prompt tail copy + 10 response tokens)."""
    return rows.input_ids[r, 15:].tolist()


# -- shrink ---------------------------------------------------------------------------------------


def test_shrink_hand_written():
    steps = [2, 1, 2, 4, 3, 3, 5, 7, 6, 7]
    blocks = [1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    shrunk, rounds = shrink_steps(steps, blocks, 1)
    assert shrunk.tolist() == steps
    assert rounds.tolist() == [2, 1, 2, 2, 1, 1, 3, 2, 1, 2]
    # s = 2, per block: {1,2} -> 2; {3,4} -> 4, {5} -> 5; {6,7} -> 7
    shrunk, rounds = shrink_steps(steps, blocks, 2)
    assert shrunk.tolist() == [2, 2, 2, 4, 4, 4, 5, 7, 7, 7]
    assert rounds.tolist() == [1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    # s = 2 over one group: {1,2} -> 2, {3,4} -> 4, {5,6} -> 6, {7} -> 7
    shrunk, rounds = shrink_steps(steps, [0] * 10, 2)
    assert shrunk.tolist() == [2, 2, 2, 4, 4, 4, 6, 7, 6, 7]
    assert rounds.tolist() == [1, 1, 1, 2, 2, 2, 3, 4, 3, 4]
    # s = 3 over one group with gaps and negatives: {-1,0,4} -> 4, {9} -> 9
    shrunk, rounds = shrink_steps([9, 4, -1, 0, 4], [5] * 5, 3)
    assert shrunk.tolist() == [9, 4, 4, 4, 4] and rounds.tolist() == [2, 1, 1, 1, 1]
    with pytest.raises(ConfigError, match="shrink"):
        shrink_steps(steps, blocks, 0)


# -- block family: hand-written rounds --------------------------------------------------------------


def test_block_trace_rows_hand_written_shrink_1(block_model):
    M = block_model.mask_token_id
    rows = build_trace_rows(block_model.spec, [HAND], shrink=1)
    assert rows.mask_kind == "two_copy" and rows.num_rows == 3
    # layout: prompt (5) | clean response (10) | prompt tail copy (1: token 14) | noisy (10)
    assert rows.input_ids.shape == (3, 26)
    for r in range(3):
        assert rows.input_ids[r, :15].tolist() == PROMPT_IDS + RESPONSE_IDS
    assert rows.position_ids[0].tolist() == list(range(15)) + list(range(4, 15))
    assert rows.segments[0].tolist() == [PROMPT] * 5 + [CLEAN] * 10 + [NOISY] * 11
    # round 1: every block at its first step: all masked; targets steps 1 | 3 | 6
    assert noisy_copy(rows, 0) == [14] + [M] * 10
    assert targets_by_row(rows, 0) == [1, 4, 5, 8]
    # round 2: block 1 at step 2 (j0, j2 masked), block 2 at step 4 (j3, j6), block 3 at step 7
    assert noisy_copy(rows, 1) == [14, M, 21, M, M, 24, 25, M, M, 28, M]
    assert targets_by_row(rows, 1) == [0, 2, 3, 7, 9]
    # round 3: only block 2 has a step left (5: j6); blocks 1 and 3 are clean
    assert noisy_copy(rows, 2) == [14, 20, 21, 22, 23, 24, 25, M, 27, 28, 29]
    assert targets_by_row(rows, 2) == [6]
    # every target read at its own noisy column (no shift), labelled with its own token and step
    assert torch.equal(rows.target_col, 16 + rows.target_index)
    assert torch.equal(rows.target_label, 20 + rows.target_index)
    assert torch.equal(rows.target_step, torch.tensor(STEP_MAP)[rows.target_index])
    assert sorted(rows.target_index.tolist()) == list(range(10))  # each token exactly once
    assert torch.all(rows.target_weight == 1) and torch.all(rows.target_example == 0)


def test_block_trace_rows_hand_written_shrink_2(block_model):
    M = block_model.mask_token_id
    rows = build_trace_rows(block_model.spec, [HAND], shrink=2)
    assert rows.num_rows == 2  # block 2 has 3 distinct steps -> 2 groups; the others 1 group
    assert noisy_copy(rows, 0) == [14] + [M] * 10
    assert targets_by_row(rows, 0) == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert noisy_copy(rows, 1) == [14, 20, 21, 22, 23, 24, 25, M, 27, 28, 29]
    assert targets_by_row(rows, 1) == [6]
    steps = dict(zip(rows.target_index.tolist(), rows.target_step.tolist()))
    assert [steps[j] for j in range(10)] == [2, 2, 2, 4, 4, 4, 5, 7, 7, 7]


def test_block_ids_follow_absolute_positions(block_model):
    """The same trace under a 4-token prompt: blocks are j0-3, j4-7, j8-9, no prompt tail."""
    M = block_model.mask_token_id
    ex = Example([10, 11, 12, 13], RESPONSE_IDS, STEP_MAP)
    rows = build_trace_rows(block_model.spec, [ex], shrink=1)
    assert rows.input_ids.shape == (3, 24)
    assert rows.position_ids[0].tolist() == list(range(14)) + list(range(4, 14))
    assert targets_by_row(rows, 0) == [1, 4, 5, 8]
    assert targets_by_row(rows, 1) == [0, 2, 6, 9]
    assert targets_by_row(rows, 2) == [3, 7]
    assert rows.input_ids[1, 14:].tolist() == [M, 21, M, M, 24, 25, M, M, 28, M]
    assert rows.input_ids[2, 14:].tolist() == [20, 21, 22, M, 24, 25, 26, M, 28, 29]
    # block size override: one block of 16 holds the whole response -> one round per step
    rows16 = build_trace_rows(block_model.spec, [ex], shrink=1, block_size=16)
    assert rows16.num_rows == 7 and rows16.block_size == 16


def test_full_and_shifted_trace_rows_hand_written(full_model, shifted_model):
    M = full_model.mask_token_id
    rows = build_trace_rows(full_model.spec, [HAND], shrink=2)  # shrink over the whole response
    assert rows.mask_kind == "full" and rows.num_rows == 4
    expected = [  # (masked j, target j)
        (list(range(10)), [0, 1, 2]),
        ([3, 4, 5, 6, 7, 8, 9], [3, 4, 5]),
        ([6, 7, 8, 9], [6, 8]),
        ([7, 9], [7, 9]),
    ]
    for r, (masked, target) in enumerate(expected):
        want = PROMPT_IDS + [M if j in masked else 20 + j for j in range(10)]
        assert rows.input_ids[r].tolist() == want
        assert targets_by_row(rows, r) == target
    assert torch.equal(rows.target_col, 5 + rows.target_index)
    rows1 = build_trace_rows(full_model.spec, [HAND], shrink=1)
    assert [targets_by_row(rows1, r) for r in range(rows1.num_rows)] == [
        [1], [0, 2], [4, 5], [3], [6], [8], [7, 9]]

    srows = build_trace_rows(shifted_model.spec, [HAND], shrink=2)
    assert srows.mask_kind == shifted_model.spec.attention
    assert torch.equal(srows.input_ids, rows.input_ids)
    assert torch.equal(srows.target_col, 5 + srows.target_index - 1)  # logit j-1 predicts j


@pytest.mark.parametrize("family", ["block", "full", "shifted"])
@pytest.mark.parametrize("shrink", [1, 2, 3])
def test_every_token_is_a_target_exactly_once(family, shrink):
    spec = load_model(f"tiny-{family}").spec
    rng = np.random.default_rng(shrink)
    examples = []
    for i in range(6):
        p, n = int(rng.integers(1, 9)), int(rng.integers(0, 17))
        examples.append(Example(rng.integers(0, 200, p).tolist(), rng.integers(0, 200, n).tolist(),
                                rng.integers(1, 9, n).tolist() if i % 2 else None))
    rows = build_trace_rows(spec, examples, shrink=shrink)
    got = sorted(zip(rows.target_example.tolist(), rows.target_index.tolist()))
    assert got == [(i, j) for i, ex in enumerate(examples) for j in range(len(ex.response_ids))]
    # rows per example: max distinct shrunk steps per block (block) / over the response (others)
    for i, ex in enumerate(examples):
        n = len(ex.response_ids)
        steps = np.asarray(ex.steps())
        if family == "block":
            blocks = (len(ex.prompt_ids) + np.arange(n)) // spec.block_size
        else:
            blocks = np.zeros(n, dtype=int)
        per_group = [-(-len(set(steps[blocks == k])) // shrink) for k in set(blocks.tolist())]
        assert int((rows.row_example == i).sum()) == max(per_group, default=0)
    # every target is masked in its row, and read at the right column
    shift = spec.logit_shift
    assert torch.all(rows.input_ids[rows.target_row, rows.target_col + shift] == spec.mask_token_id)


# -- equivalence with step-by-step replay (block family) ---------------------------------------------


def naive_shrink(steps, groups, s):
    out = list(steps)
    for g in set(groups):
        idx = [j for j in range(len(steps)) if groups[j] == g]
        u = sorted({steps[j] for j in idx})
        label = {v: u[min((r // s + 1) * s, len(u)) - 1] for r, v in enumerate(u)}
        for j in idx:
            out[j] = label[steps[j]]
    return out


def logprobs_of(model, ids, mask, cols, labels):
    ids = torch.tensor(ids)[None]
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        logits = model(ids, attention_mask=mask(pos), position_ids=pos)[0]
    return logits.log_softmax(-1)[cols, labels]


def replay_block_trace(model, ex, shrink):
    """Each decoding step on its own: [prompt | clean earlier blocks | current block state]
    with the ordinary block-causal mask; returns {j: log p(y_j | state before its step)}."""
    b, M = model.block_size, model.mask_token_id
    p, resp = len(ex.prompt_ids), ex.response_ids
    blocks = [(p + j) // b for j in range(len(resp))]
    steps = naive_shrink(ex.steps(), blocks, shrink)
    out = {}
    for k in sorted(set(blocks)):
        in_k = [j for j in range(len(resp)) if blocks[j] == k]
        for c in sorted({steps[j] for j in in_k}):
            state = [M if (j in in_k and steps[j] >= c) else resp[j] for j in range(in_k[-1] + 1)]
            tgt = [j for j in in_k if steps[j] == c]
            lp = logprobs_of(model, ex.prompt_ids + state, lambda pos: masks.block_causal_mask(pos, b),
                             [p + j for j in tgt], [resp[j] for j in tgt])
            out.update(zip(tgt, lp.tolist()))
    return out


def one_pass(model, rows):
    with torch.no_grad():
        lp = target_logprobs(model, rows)
    return {(e, j): v for e, j, v in zip(rows.target_example.tolist(), rows.target_index.tolist(),
                                         lp.tolist())}


def assert_matches(batched, naive_per_example, atol=ATOL):
    expected = {(i, j): v for i, d in enumerate(naive_per_example) for j, v in d.items()}
    assert batched.keys() == expected.keys()
    got = torch.tensor([batched[k] for k in expected], dtype=torch.float64)
    want = torch.tensor([expected[k] for k in expected], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def sampled(block_model):
    """Two real traces from the sampler (dynamic unmasking, so tokens share steps)."""
    config = SamplingConfig(max_new_tokens=11, steps=2, strategy="dynamic", threshold=0.5,
                            temperature=1.0, seed=3, stop_token_ids=())
    gens = generate(block_model, [[65, 66, 67, 68, 69, 70], [71]], config)
    assert any(len(set(g.step_map)) < len(g.step_map) for g in gens)
    return gens


@pytest.fixture(scope="module")
def block_examples(sampled):
    """Hand-made traces (prompt lengths 5, 8, 3: two not multiples of 4) plus the sampler's."""
    rng = np.random.default_rng(0)
    examples = [HAND]
    for p, n in ((8, 7), (3, 13)):
        prompt = rng.integers(0, 256, p).tolist()
        response = rng.integers(0, 256, n).tolist()
        blocks = (p + np.arange(n)) // 4
        steps = (blocks * 10 + rng.integers(1, 4, n)).tolist()  # per-block windows with ties
        examples.append(Example(prompt, response, steps))
    return examples + [as_example(g) for g in sampled]


@pytest.mark.parametrize("shrink", [1, 2])
def test_block_trace_one_pass_equals_stepwise_replay(block_model, block_examples, sampled, shrink):
    # the sampler's Generation records go in as they are (token ids + step map, no text)
    rows = build_trace_rows(block_model.spec, block_examples[:3] + sampled, shrink=shrink)
    assert (rows.segments == PAD).any(), "examples of different lengths must be left-padded"
    batched = one_pass(block_model, rows)
    assert_matches(batched, [replay_block_trace(block_model, ex, shrink) for ex in block_examples])


def test_block_trace_one_pass_equals_stepwise_replay_float32(block_examples):
    model = scrambled("tiny-block", dtype=torch.float32)
    rows = build_trace_rows(model.spec, block_examples, shrink=1)
    batched = one_pass(model, rows)
    naive = [replay_block_trace(model, ex, 1) for ex in block_examples]
    assert_matches(batched, naive, atol=1e-4)


def test_block_sft_one_pass_equals_per_block_forwards(block_model, block_examples):
    b, M = block_model.block_size, block_model.mask_token_id
    rows = block_sft_rows(block_model.spec, block_examples, torch.Generator().manual_seed(0))
    assert rows.num_rows == len(block_examples) and (rows.segments == PAD).any()
    batched = one_pass(block_model, rows)
    naive = []
    for i, ex in enumerate(block_examples):
        p, resp = len(ex.prompt_ids), ex.response_ids
        masked = set(rows.target_index[rows.target_example == i].tolist())
        blocks = [(p + j) // b for j in range(len(resp))]
        out = {}
        for k in sorted(set(blocks)):
            in_k = [j for j in range(len(resp)) if blocks[j] == k]
            tgt = [j for j in in_k if j in masked]
            if not tgt:
                continue
            state = [M if j in tgt else resp[j] for j in range(in_k[-1] + 1)]
            lp = logprobs_of(block_model, ex.prompt_ids + state,
                             lambda pos: masks.block_causal_mask(pos, b),
                             [p + j for j in tgt], [resp[j] for j in tgt])
            out.update(zip(tgt, lp.tolist()))
        naive.append(out)
    assert_matches(batched, naive)


def test_block_sft_masks_per_block_levels(block_model):
    """Each block gets its own level: across many draws, the masked fraction of a block
    follows its level, and blocks of one example are masked with different frequencies."""
    ex = Example([1, 2, 3], list(range(40, 53)), None)  # blocks: j0 | j1-4 | j5-8 | j9-12
    rows = block_sft_rows(block_model.spec, [ex] * 400, torch.Generator().manual_seed(5))
    w = rows.target_weight
    # inside one (example, block) every target has the same weight 1/t_block
    blocks = (3 + rows.target_index) // 4
    key = rows.target_example * 10 + blocks
    for k in key.unique()[:50]:
        assert torch.unique(w[key == k]).numel() == 1
    assert torch.all((w >= 1 / 0.9 - 1e-5) & (w <= 1 / 0.1 + 1e-5))
    # levels differ across blocks of the same example (not one level per row)
    per_row = [torch.unique(w[(rows.target_example == e)]).numel() for e in range(20)]
    assert max(per_row) > 1


# -- full and shifted families ----------------------------------------------------------------------


def test_shifted_trace_reads_position_before_token(shifted_model, block_examples):
    """Trace rows of a shifted model == a naive replay: [prompt | clean earlier blocks | current
    block state] (its attention is block-causal), log-prob of token j from the logits at j-1."""
    model = shifted_model
    assert model.spec.attention == "block" and model.spec.logit_shift == 1
    b, M = model.block_size, model.mask_token_id
    examples = [ex for ex in block_examples if len(ex.prompt_ids) > 0]
    for shrink in (1, 2):
        rows = build_trace_rows(model.spec, examples, shrink=shrink)
        batched = one_pass(model, rows)
        naive = []
        for ex in examples:
            p, resp = len(ex.prompt_ids), ex.response_ids
            steps = naive_shrink(ex.steps(), [0] * len(resp), shrink)
            blocks = [(p + j) // b for j in range(len(resp))]
            out = {}
            for c in sorted(set(steps)):
                tgt = [j for j in range(len(resp)) if steps[j] == c]
                for k in sorted({blocks[j] for j in tgt}):
                    in_k = [j for j in tgt if blocks[j] == k]
                    end = max(j for j in range(len(resp)) if blocks[j] == k) + 1
                    state = [M if steps[j] >= c else resp[j] for j in range(end)]
                    lp = logprobs_of(model, ex.prompt_ids + state,
                                     lambda pos: masks.block_causal_mask(pos, b),
                                     [p + j - 1 for j in in_k], [resp[j] for j in in_k])
                    out.update(zip(in_k, lp.tolist()))
            naive.append(out)
        assert_matches(batched, naive)


def test_full_trace_rows_batched_equal_unpadded(full_model, block_examples):
    model = full_model
    M = model.mask_token_id
    rows = build_trace_rows(model.spec, block_examples, shrink=2)
    assert (rows.segments == PAD).any()
    batched = one_pass(model, rows)
    naive = []
    for ex in block_examples:
        p, resp = len(ex.prompt_ids), ex.response_ids
        steps = naive_shrink(ex.steps(), [0] * len(resp), 2)
        out = {}
        for c in sorted(set(steps)):
            tgt = [j for j in range(len(resp)) if steps[j] == c]
            state = [M if s >= c else t for t, s in zip(resp, steps)]
            lp = logprobs_of(model, ex.prompt_ids + state,
                             lambda pos: masks.full_mask(pos.shape[1], torch.ones_like(pos, dtype=torch.bool)),
                             [p + j for j in tgt], [resp[j] for j in tgt])
            out.update(zip(tgt, lp.tolist()))
        naive.append(out)
    assert_matches(batched, naive)


# -- the loss: normalisation and micro-batching -------------------------------------------------------


def loss_and_grads(model, rows_list, normaliser):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for rows in rows_list:
        loss, _ = sft_loss(model, rows, normaliser)
        loss.backward()
        total += float(loss.detach())
    grads = [p.grad.detach().clone() for p in model.backbone.parameters()]
    model.zero_grad(set_to_none=True)
    return total, grads


@pytest.mark.parametrize("method", ["trace", "block"])
def test_micro_batches_sum_to_full_batch(block_model, block_examples, method):
    model = block_model
    examples = block_examples[:4]
    n = count_response_tokens(examples)
    assert n == sum(len(ex.response_ids) for ex in examples)
    build = lambda exs, gen: build_sft_rows(method, model.spec, exs, gen)  # noqa: E731
    full = build(examples, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)  # one generator, examples built one after the other
    singles = [build([ex], gen) for ex in examples]
    # the noise of a batch == the noise of its examples drawn in order
    assert sum(r.num_targets for r in singles) == full.num_targets
    for i, r in enumerate(singles):
        f = full.select_examples([i])
        assert torch.equal(r.target_index, f.target_index) and torch.equal(r.target_weight, f.target_weight)
        assert torch.equal(r.input_ids, f.input_ids)  # select drops the batch's left padding
    loss_full, grads_full = loss_and_grads(model, [full], n)
    loss_micro, grads_micro = loss_and_grads(model, singles, n)
    assert abs(loss_full - loss_micro) < 1e-6
    for gf, gm in zip(grads_full, grads_micro):
        torch.testing.assert_close(gm, gf, atol=1e-6, rtol=0)
    assert any(g.abs().max() > 1e-3 for g in grads_full)
    # also by rows: split(2) of the full batch
    loss_split, grads_split = loss_and_grads(model, full.split(2), n)
    assert abs(loss_full - loss_split) < 1e-6
    for gf, gs in zip(grads_full, grads_split):
        torch.testing.assert_close(gs, gf, atol=1e-6, rtol=0)


def test_loss_is_weighted_token_sum_over_normaliser(block_model, block_examples):
    rows = build_trace_rows(block_model.spec, block_examples)
    with torch.no_grad():
        lp = target_logprobs(block_model, rows)
        loss, stats = sft_loss(block_model, rows, 123)
    assert torch.isclose(loss, -lp.sum() / 123, atol=1e-6)
    assert stats["targets"] == count_response_tokens(block_examples) == rows.num_targets
    assert stats["weight_sum"] == pytest.approx(rows.num_targets)
    # an empty micro-batch gives a zero loss that still backpropagates
    empty = build_trace_rows(block_model.spec, [Example([1, 2], [], None)])
    assert empty.num_rows == 0
    loss, stats = sft_loss(block_model, empty, 10)
    loss.backward()
    assert float(loss.detach()) == 0.0 and stats["targets"] == 0
    block_model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="normaliser"):
        sft_loss(block_model, rows, 0)


def test_select_trims_padding_and_keeps_logprobs(block_model, block_examples):
    rows = build_trace_rows(block_model.spec, block_examples)
    all_lp = one_pass(block_model, rows)
    short = int(np.argmin([int((rows.segments[r] != PAD).sum()) for r in range(rows.num_rows)]))
    sub = rows.select([short])
    assert sub.input_ids.shape[1] < rows.input_ids.shape[1] and not (sub.segments == PAD).any()
    for k, v in one_pass(block_model, sub).items():
        assert abs(all_lp[k] - v) < ATOL


# -- noise: expected weights, redraws, reproducibility -------------------------------------------------


def mean_weight_per_token(rows, copies, n):
    total = torch.zeros(n, dtype=torch.float64)
    total.index_add_(0, rows.target_index, rows.target_weight.double())
    return total / copies


@pytest.mark.parametrize("complementary", [False, True])
def test_random_masking_expected_weight_is_one(complementary):
    spec = load_model("tiny-full").spec
    ex = Example([1, 2, 3], list(range(30, 42)), None)
    copies = 3000
    rows = random_masking_rows(spec, [ex] * copies, torch.Generator().manual_seed(0),
                               complementary=complementary)
    per_token = mean_weight_per_token(rows, copies, 12)
    assert torch.all((per_token - 1).abs() < 0.12), per_token
    assert abs(float(per_token.mean()) - 1) < 0.04
    if complementary:  # each draw masks every token in exactly one of its two rows
        per_draw = torch.zeros(copies, 12, dtype=torch.long)
        per_draw.index_put_((rows.target_example, rows.target_index),
                            torch.ones_like(rows.target_index), accumulate=True)
        assert torch.all(per_draw == 1)
    # several samples per example: weights divided by the number of samples
    rows = random_masking_rows(spec, [ex] * 1000, torch.Generator().manual_seed(1), samples=3)
    assert rows.num_rows <= 3000
    assert abs(float(mean_weight_per_token(rows, 1000, 12).mean()) - 1) < 0.04


def test_block_sft_and_semi_ar_expected_weight_is_one():
    ex = Example([1, 2, 3, 4, 5], list(range(30, 43)), None)
    copies = 3000
    rows = block_sft_rows(load_model("tiny-block").spec, [ex] * copies, torch.Generator().manual_seed(0))
    assert abs(float(mean_weight_per_token(rows, copies, 13).mean()) - 1) < 0.04
    spec = load_model("tiny-full").spec  # block size 8: blocks j0-2 | j3-10 | j11-12
    rows = semi_ar_rows(spec, [ex] * copies, torch.Generator().manual_seed(0))
    assert abs(float(mean_weight_per_token(rows, copies, 13).mean()) - 1) < 0.04


def test_semi_ar_rows_structure(full_model):
    M = full_model.mask_token_id
    ex = Example([1, 2, 3, 4, 5], list(range(30, 43)), None)
    rows = semi_ar_rows(full_model.spec, [ex], torch.Generator().manual_seed(0), low=0.9, high=0.9)
    blocks = [[0, 1, 2], list(range(3, 11)), [11, 12]]  # absolute positions 5..17, block size 8
    assert rows.mask_kind == "full" and rows.num_rows <= 3
    for r in range(rows.num_rows):
        tgt = targets_by_row(rows, r)
        k = next(i for i, blk in enumerate(blocks) if tgt[0] in blk)
        assert set(tgt) <= set(blocks[k]) and torch.all(rows.target_step[rows.target_row == r] == k)
        resp = rows.input_ids[r, 5:].tolist()
        for i, blk in enumerate(blocks):
            for j in blk:
                if i < k:
                    assert resp[j] == 30 + j  # earlier blocks clean
                elif i > k:
                    assert resp[j] == M  # later blocks all masked
                else:
                    assert (resp[j] == M) == (j in tgt)
        assert torch.allclose(rows.target_weight, torch.tensor(1 / 0.9))


def test_noise_is_redrawn_and_reproducible(block_model, full_model):
    examples = [Example([1, 2, 3], list(range(30, 50)), None), Example([4], list(range(60, 75)), None)]
    for build, spec in ((block_sft_rows, block_model.spec), (random_masking_rows, full_model.spec),
                        (semi_ar_rows, full_model.spec)):
        gen = torch.Generator().manual_seed(11)
        a, b = build(spec, examples, gen), build(spec, examples, gen)
        assert not torch.equal(a.input_ids, b.input_ids) or not torch.equal(a.target_weight, b.target_weight)
        gen2 = torch.Generator().manual_seed(11)
        a2 = build(spec, examples, gen2)
        assert torch.equal(a.input_ids, a2.input_ids) and torch.equal(a.target_weight, a2.target_weight)
        # resuming from a saved generator state draws the same masks
        state = gen2.get_state()
        b2 = build(spec, examples, torch.Generator().set_state(state))
        assert torch.equal(b.input_ids, b2.input_ids) and torch.equal(b.target_index, b2.target_index)


# -- AR SFT == transformers' causal-LM loss ------------------------------------------------------------


def test_ar_sft_equals_transformers_causal_lm_loss(shifted_model):
    model = shifted_model
    rng = np.random.default_rng(4)
    examples = [Example(rng.integers(0, 256, p).tolist(), rng.integers(0, 256, n).tolist(), None)
                for p, n in ((4, 9), (7, 3), (1, 12))]
    rows = ar_rows(model.spec, examples)
    assert rows.mask_kind == "causal" and torch.all(rows.target_weight == 1)
    # transformers: right padding, labels -100 on prompt and padding, mean over response tokens
    width = max(len(ex.prompt_ids) + len(ex.response_ids) for ex in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    att = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -100)
    for i, ex in enumerate(examples):
        seq = ex.prompt_ids + ex.response_ids
        ids[i, :len(seq)] = torch.tensor(seq)
        att[i, :len(seq)] = 1
        labels[i, len(ex.prompt_ids):len(seq)] = torch.tensor(ex.response_ids)
    with torch.no_grad():
        ours, _ = sft_loss(model, rows, count_response_tokens(examples))
        theirs = model.backbone(input_ids=ids, attention_mask=att, labels=labels).loss
        for i, ex in enumerate(examples):  # and one example at a time
            one, _ = sft_loss(model, ar_rows(model.spec, [ex]), len(ex.response_ids))
            hf = model.backbone(input_ids=ids[i:i + 1], attention_mask=att[i:i + 1],
                                labels=labels[i:i + 1]).loss
            assert abs(float(one) - float(hf)) < 1e-5
    assert abs(float(ours) - float(theirs)) < 1e-5
    assert float(ours) > 1.0  # scrambled weights: far from a trivial loss


# -- errors --------------------------------------------------------------------------------------------


def test_errors_name_the_problem(block_model, full_model, shifted_model):
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match="step_map"):
        Example([1], [2, 3], [1])
    with pytest.raises(ConfigError, match="valid for 'block'"):
        build_sft_rows("ar", block_model.spec, [HAND], gen)
    with pytest.raises(ConfigError, match="random_masking"):
        random_masking_rows(block_model.spec, [HAND], gen)
    with pytest.raises(ConfigError, match="block"):
        block_sft_rows(full_model.spec, [HAND], gen)
    with pytest.raises(ConfigError, match="unknown sft method"):
        build_sft_rows("bogus", block_model.spec, [HAND], gen)
    with pytest.raises(ConfigError, match="unknown option"):
        build_sft_rows("trace", block_model.spec, [HAND], gen, low=0.2)
    with pytest.raises(ConfigError, match="Generator"):
        build_sft_rows("block", block_model.spec, [HAND])
    with pytest.raises(ConfigError, match="mask levels"):
        random_masking_rows(full_model.spec, [HAND], gen, low=0.5, high=1.0, complementary=True)
    with pytest.raises(ConfigError, match="empty prompt"):
        trace_sft_rows(shifted_model.spec, [Example([], [1, 2], None)])
    # a trainer's record dict and a sampler Generation are accepted as examples
    rows = trace_sft_rows(block_model, [{"prompt_ids": [1, 2], "response_ids": [3, 4, 5]}])
    assert rows.num_targets == 3
