"""tracerl_sdpa (models/attention.py) gives transformers' sdpa numbers bitwise, forward and
backward, on every preset (grouped-query and not); checkpoints never record it."""

from __future__ import annotations

import json

import pytest
import torch

from tracerl.models import load_model


@pytest.mark.parametrize("name", ["tiny-block", "tiny-shifted", "tiny-full"])
def test_same_logits_and_gradients_as_stock_sdpa(name):
    model = load_model(name)
    assert model.backbone.config._attn_implementation == "tracerl_sdpa"
    assert model.config.num_attention_heads != model.config.num_key_value_heads  # the GQA path is taken
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (3, 24), generator=gen)
    pos = torch.arange(24).expand(3, 24)
    valid = torch.ones(3, 24, dtype=torch.bool)
    valid[0, :5] = False  # left padding
    mask = model.attention_mask(pos, valid)
    runs = {}
    for impl in ("sdpa", "tracerl_sdpa"):
        model.backbone.set_attn_implementation(impl)
        model.zero_grad()
        logits = model(ids, attention_mask=mask, position_ids=pos)
        logits.logsumexp(-1)[valid].sum().backward()
        runs[impl] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
    assert torch.equal(runs["sdpa"][0], runs["tracerl_sdpa"][0])
    assert all(torch.equal(a, b) for a, b in zip(runs["sdpa"][1], runs["tracerl_sdpa"][1]))


def test_saved_checkpoint_does_not_name_it(tmp_path):
    model = load_model("tiny-block")
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert "tracerl_sdpa" not in json.dumps(config)
    assert load_model(tmp_path / "ckpt").backbone.config._attn_implementation == "tracerl_sdpa"
