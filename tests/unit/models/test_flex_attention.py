"""The FlexAttention training path (loop.attention=flex): its mask rules equal the dense masks
pair by pair for every mask kind, and the families' forwards through a BlockMask give the same
target log-probs and values as SDPA with dense masks.  CPU runs flex forward only (torch has no
flex backward on CPU), so training with it is refused here; the GPU figure is a benchmark."""

from __future__ import annotations

import warnings

import pytest
import torch

from tracerl import masks
from tracerl.config import load_config
from tracerl.errors import ConfigError
from tracerl.models import load_model
from tracerl.objectives import ValueModel, build_trace_rows, target_logprobs
from tracerl.objectives.examples import Example
from tracerl.objectives.sft import ar_rows, block_sft_rows, random_masking_rows
from tracerl.recipes.rl import check_rl_config
from tracerl.rl import RLConfig
from tracerl.train.loop import LoopConfig, TrainingRun
from tracerl.train.optim import OptimConfig


def _examples(model, seed: int, count: int = 5) -> list[Example]:
    """Prompts of 3-9 tokens (most not a multiple of the block size) and responses of 2-11 with
    random decoding orders: rows of different lengths, so the batch is left-padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        p, r = (int(x) for x in (torch.randint(3, 10, (1,), generator=g), torch.randint(2, 12, (1,), generator=g)))
        ids = torch.randint(5, len(model.tokenizer) - 5, (p + r,), generator=g).tolist()
        steps = (torch.randperm(r, generator=g) // 2 + 1).tolist()
        out.append(Example(ids[:p], ids[p:], step_map=steps))
    return out


def _rows(kind: str, model, seed: int):
    exs, g = _examples(model, seed), torch.Generator().manual_seed(seed)
    pad = model.tokenizer.pad_token_id
    if kind == "trace":
        return build_trace_rows(model, exs, pad_id=pad)
    if kind == "block_sft":
        return block_sft_rows(model, exs, g, pad_id=pad)
    if kind == "random_masking":
        return random_masking_rows(model, exs, g, pad_id=pad)
    return ar_rows(model, exs, pad_id=pad)


CASES = [("tiny-block", "trace"), ("tiny-block", "block_sft"), ("tiny-full", "trace"),
         ("tiny-full", "random_masking"), ("tiny-shifted", "trace"), ("tiny-shifted", "ar")]


@pytest.mark.parametrize("preset,kind", CASES)
def test_the_flex_rule_is_the_dense_mask_for_every_valid_query(preset, kind):
    model = load_model(preset)
    for seed in range(3):
        rows = _rows(kind, model, seed)
        dense = rows.attention_mask
        flex = masks.flex_rule_dense(rows.mask_kind, rows.position_ids, rows.segments, rows.block_size)
        valid = rows.valid[:, None, :, None]  # query rows that are tokens (padding rows are never read)
        assert flex.shape == dense.shape and rows.valid.logical_not().any()  # padded batches are covered
        assert torch.equal(flex & valid, dense & valid), (preset, kind, seed)
    assert {rows.mask_kind for rows in [_rows(k, load_model(p), 0) for p, k in CASES]} == set(masks_kinds())


def masks_kinds():
    from tracerl.objectives.rows import MASK_KINDS

    return MASK_KINDS


@pytest.mark.parametrize("preset,kind", CASES)
def test_forwards_through_a_block_mask_equal_dense_sdpa(preset, kind):
    model = load_model(preset)
    rows = _rows(kind, model, 7)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it materialises the scores
        dense = target_logprobs(model, rows, policy=True)
        model.train_attention = "flex"
        flex = target_logprobs(model, rows, policy=True)
    assert dense.numel() == rows.num_targets > 0
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


def test_the_value_model_reads_the_same_values_through_a_block_mask():
    model = load_model("tiny-block")
    value = ValueModel(model)
    torch.nn.init.normal_(value.value_head.weight, generator=torch.Generator().manual_seed(0))
    rows = _rows("trace", model, 3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = value.values(rows)
        value.lm.train_attention = "flex"
        flex = value.values(rows)
    assert dense.abs().sum() > 0
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


def test_flex_training_is_refused_where_torch_has_no_flex_backward(tmp_path):
    with pytest.raises(ConfigError, match="loop.attention=flex: FlexAttention has no backward pass on cpu"):
        check_rl_config(load_config(RLConfig, None, ["loop.attention=flex"]))
    with pytest.raises(ConfigError, match="loop.attention=flex"):
        TrainingRun(load_model("tiny-block"), output_dir=tmp_path, max_steps=1, save_every=0, seed=0,
                    optim=OptimConfig(), loop=LoopConfig(attention="flex", report_to=["none"]))
    with pytest.raises(ConfigError, match="loop.attention: 'xformers'; valid: sdpa, flex"):
        LoopConfig(attention="xformers")
