"""Test support: tiny presets with large random weights (no tests in this module)."""

from __future__ import annotations

import torch

from tracerl.models import load_model


def scrambled(name: str, std: float = 0.2, dtype: torch.dtype = torch.float32, **overrides):
    """A preset whose 2-D weights are redrawn with a large std (seeded).

    A freshly initialised model repeats one token and is nearly uniform, which would hide a wrong
    mask, column or cache; these weights give varied greedy outputs and sharp, clearly
    state-dependent log-probs.  Exactness tests that compare two layouts of the same computation
    pass ``dtype=torch.float64`` so summation order (~1e-5 in float32) cannot matter."""
    model = load_model(name, dtype=dtype, **overrides)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.backbone.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model
