"""Test support: tiny presets with large random weights, and a tiny model SFT'd to be right half
the time (no tests in this module)."""

from __future__ import annotations

import json

import torch

from tracerl.config import load_config
from tracerl.models import load_model
from tracerl.recipes.sft import SFTConfig, run_sft


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


def picks_seven_or_eight(root, model: str = "tiny-full", steps: int = 15):
    """A tiny checkpoint (tiny-full by default) briefly SFT'd to answer "Pick i:" with 7 (even i)
    or 8 (odd i), and the task options that pose those questions.  After the default 15 steps it
    answers right about 5-10 % of the time at temperature 1 (40 steps: about 28 %), mostly stopping
    at once otherwise, so groups of 8 or more have rewards to learn from (a random model scores 0
    everywhere, its advantages are all 0 and nothing would train)."""
    data = root / "pick.jsonl"
    data.write_text("".join(json.dumps({"question": f"Pick {i}:", "ground_truth_answer": str(7 + i % 2)}) + "\n"
                            for i in range(8)))
    task = ["task.source=jsonl", f"task.name={data}", "task.template=raw", "task.chat=false", "task.size=0"]
    sft = run_sft(load_config(SFTConfig, None, [f"data.{t}" for t in task] + [
        f"output_dir={root / 'sft'}", f"model={model}", f"max_steps={steps}", 'data.response_format=" {answer}"',
        "loop.micro_batch=8", "optim.lr=3e-3", "optim.warmup_steps=0"]), progress=False)
    return sft["final_checkpoint"], task
