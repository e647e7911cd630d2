"""Training benchmark: block-SFT throughput, and what the one-pass two-copy layout saves.

``bench_train(quick)`` measures, in one run and on one model (default ``tiny-block``):

* **training throughput**: full optimizer steps of block SFT (row building, forward, backward,
  gradient clipping, AdamW) on a batch of ``batch x (prompt + response)`` random tokens;
  ``tokens_per_s`` counts the examples' prompt + response tokens (what a user feeds in),
  ``response_tokens_per_s`` the supervised ones;
* **two-copy vs one forward per block**: the same noisy blocks (same masks, same 1/t weights),
  forward + backward, either as one two-copy row per example (``[prompt | clean | noisy]``,
  masks.two_copy_mask) or naively, one ordinary block-causal forward per response block ``k``
  over ``[prompt | clean blocks < k | noisy block k]`` with the loss on block ``k``'s targets.
  Both compute the same loss (reported as ``loss_abs_diff``, a correctness check of the two-copy
  mask) and the same gradients; ``per_block_over_two_copy`` is the time ratio.

Timings are medians over ``repeats`` runs after one warm-up.  Wire it as ``tracerl bench
train``; ``format_train_table(result)`` renders the human-readable table.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from tracerl import masks
from tracerl.errors import ConfigError
from tracerl.progress import ProgressReporter
from tracerl.objectives import Example, block_sft_rows, count_response_tokens, sft_loss
from tracerl.train.optim import OptimConfig, Optimizer

FULL = dict(batch=16, prompt_len=64, response_len=128, repeats=5)
QUICK = dict(batch=4, prompt_len=16, response_len=32, repeats=2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_examples(tokenizer, batch: int, prompt_len: int, response_len: int, seed: int) -> list[Example]:
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    ids = ordinary[torch.randint(len(ordinary), (batch, prompt_len + response_len), generator=g)].tolist()
    return [Example(row[:prompt_len], row[prompt_len:]) for row in ids]


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (allocator, kernels, lazy init)
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _per_block_loss_backward(model, examples: list[Example], rows, normaliser: float) -> tuple[float, int]:
    """The naive reference: for each response block k, one block-causal forward over
    ``[prompt | clean blocks < k | noisy block k]`` (batched over the examples, which share their
    lengths), loss = the block's targets with the two-copy rows' weights; backward per block.
    Returns (summed loss, number of forwards)."""
    device = model.device
    b = rows.block_size
    p, n = len(examples[0].prompt_ids), len(examples[0].response_ids)
    tokens = torch.tensor([ex.prompt_ids + ex.response_ids for ex in examples], device=device)
    # The masked set and weights, read back from the two-copy rows' targets (rows follow examples).
    masked = torch.zeros(len(examples), n, dtype=torch.bool, device=device)
    weight = torch.zeros(len(examples), n, dtype=torch.float32, device=device)
    ex_of_row = rows.row_example.to(device)[rows.target_row.to(device)]
    idx = rows.target_index.to(device)
    masked[ex_of_row, idx] = True
    weight[ex_of_row, idx] = rows.target_weight.to(device)
    blocks = (p + torch.arange(n, device=device)) // b
    total, forwards = 0.0, 0
    for k in torch.unique(blocks).tolist():
        in_block = blocks == k
        if not masked[:, in_block].any():
            continue  # nothing to learn from this block in this batch
        end = min((k + 1) * b, p + n)
        ids = tokens[:, :end].clone()
        noisy = torch.zeros_like(ids, dtype=torch.bool)
        noisy[:, p:end] = masked[:, : end - p] & in_block[: end - p]
        ids[noisy] = model.mask_token_id
        positions = torch.arange(end, device=device).expand(len(examples), end)
        mask = masks.block_causal_mask(positions, b)
        hidden, _ = model.hidden_states(ids, attention_mask=mask, position_ids=positions)
        e, col = noisy.nonzero(as_tuple=True)
        logits = model.lm_logits(hidden[e, col]).float()
        logp = logits.log_softmax(-1).gather(-1, tokens[e, col][:, None]).squeeze(-1)
        loss = -(weight[e, col - p] * logp).sum() / normaliser
        loss.backward()
        total += float(loss.detach())
        forwards += 1
    return total, forwards


def bench_train(quick: bool = False, *, model_name: str = "tiny-block", device: str = "cpu",
                batch: int | None = None, prompt_len: int | None = None, response_len: int | None = None,
                repeats: int | None = None, seed: int = 0, progress: bool | str = False) -> dict:
    """Training tokens/s of block SFT and the two-copy vs per-block forward+backward cost."""
    from tracerl.models import load_model

    sizes = dict(QUICK if quick else FULL)
    for key, value in (("batch", batch), ("prompt_len", prompt_len), ("response_len", response_len),
                       ("repeats", repeats)):
        if value is not None:
            if value < 1:
                raise ConfigError(f"bench train: {key} must be >= 1, got {value}")
            sizes[key] = value
    model = load_model(model_name, device=device)
    if model.family != "block":
        raise ConfigError(f"bench train: needs a block-family model (two-copy rows), {model_name!r} is "
                          f"{model.family!r}")
    dev = model.device
    examples = _random_examples(model.tokenizer, sizes["batch"], sizes["prompt_len"], sizes["response_len"], seed)
    normaliser = count_response_tokens(examples)
    b = model.block_size
    model.train()

    def autocast():  # as the training loop does: bf16 autocast on GPU, fp32 on CPU
        if dev.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    params = [p for p in model.backbone.parameters() if p.requires_grad]

    # 1. Whole optimizer steps: rows (fresh noise each step), forward, backward, clip, AdamW.
    optimizer = Optimizer(params, OptimConfig(lr=1e-4), total_steps=10**9)
    step_counter = [0]

    def train_step():
        g = torch.Generator().manual_seed(seed * 7919 + step_counter[0])
        rows = block_sft_rows(model.spec, examples, g).to(dev)
        with autocast():
            loss, _ = sft_loss(model, rows, normaliser)
        loss.backward()
        optimizer.step(step_counter[0], float(loss.detach()))
        step_counter[0] += 1

    with ProgressReporter("bench train", 3, unit="phase", progress=progress) as bar:
        step_s, _ = _timed(train_step, dev, sizes["repeats"])
        bar.update(advance=1, step_seconds=step_s)

        # 2. Same masks both ways, forward + backward only (gradients zeroed between runs).
        rows = block_sft_rows(model.spec, examples, torch.Generator().manual_seed(seed)).to(dev)

        def two_copy():
            for p in params:
                p.grad = None
            with autocast():
                loss, _ = sft_loss(model, rows, normaliser)
            loss.backward()
            return float(loss.detach())

        def per_block():
            for p in params:
                p.grad = None
            with autocast():
                return _per_block_loss_backward(model, examples, rows, normaliser)

        two_copy_s, two_copy_loss = _timed(two_copy, dev, sizes["repeats"])
        bar.update(advance=1, two_copy_seconds=two_copy_s)
        two_copy_grad = [p.grad.detach().clone() for p in params]
        per_block_s, (per_block_loss, forwards) = _timed(per_block, dev, sizes["repeats"])
        bar.update(advance=1, per_block_seconds=per_block_s)
    grad_diff = max(float((p.grad - g0).abs().max()) for p, g0 in zip(params, two_copy_grad))
    grad_scale = max(float(g0.abs().max()) for g0 in two_copy_grad)
    for p in params:
        p.grad = None

    example_tokens = sizes["batch"] * (sizes["prompt_len"] + sizes["response_len"])
    return {
        "model": model_name,
        "device": str(dev),
        "quick": quick,
        "batch": sizes["batch"],
        "prompt_len": sizes["prompt_len"],
        "response_len": sizes["response_len"],
        "block_size": b,
        "repeats": sizes["repeats"],
        "step_seconds": step_s,
        "tokens_per_s": example_tokens / step_s,
        "response_tokens_per_s": normaliser / step_s,
        "two_copy_seconds": two_copy_s,
        "two_copy_row_tokens": int(rows.input_ids.shape[1]),
        "per_block_seconds": per_block_s,
        "per_block_forwards": forwards,
        "per_block_over_two_copy": per_block_s / two_copy_s,
        "targets": rows.num_targets,
        "loss": two_copy_loss,
        "loss_abs_diff": abs(two_copy_loss - per_block_loss),
        "grad_max_abs_diff": grad_diff,
        "grad_max_abs": grad_scale,
    }


def format_train_table(result: dict) -> str:
    r = result
    head = (f"bench train: {r['model']} on {r['device']}, batch {r['batch']} x ({r['prompt_len']} prompt + "
            f"{r['response_len']} response), block {r['block_size']}, median of {r['repeats']}")
    lines = [
        head,
        f"{'training step (rows+fwd+bwd+AdamW)':38s} {r['step_seconds'] * 1000:10.1f} ms   "
        f"{r['tokens_per_s']:10.0f} tokens/s ({r['response_tokens_per_s']:.0f} response tokens/s)",
        f"{'two-copy fwd+bwd (1 forward)':38s} {r['two_copy_seconds'] * 1000:10.1f} ms   "
        f"row of {r['two_copy_row_tokens']} tokens",
        f"{'per-block fwd+bwd (' + str(r['per_block_forwards']) + ' forwards)':38s} "
        f"{r['per_block_seconds'] * 1000:10.1f} ms",
        f"{'per-block / two-copy':38s} {r['per_block_over_two_copy']:10.2f}x",
        f"{'same loss, same gradients':38s} |dloss| {r['loss_abs_diff']:.1e}, max |dgrad| "
        f"{r['grad_max_abs_diff']:.1e} (max |grad| {r['grad_max_abs']:.1e})",
    ]
    return "\n".join(lines)
