"""Training step on a GPU for an SDAR-4B-shaped random model: dense-mask SDPA against the
FlexAttention path (``loop.attention=flex``), peak memory and tokens/s (the distributed issue's
GPU figure).

Shape: the Qwen3 configuration of SDAR-4B (engine_gpu.py's ``random_model``), fp32 master weights,
sharded with FSDP2 over a one-process group as ``tracerl sft``/``rl`` shard every rank's model
(bf16 compute, fp32 reduction on GPU; ``--no-fsdp``: a plain module under bf16 autocast),
gradient checkpointing on.  Workload: block-SFT
steps on two-copy rows (``[prompt | clean | noisy]``, the layout whose dense ``(2L)^2`` mask the
flex path replaces) of ``--batch`` random examples of ``--prompt`` + ``--response`` tokens,
forward + backward + AdamW; ``--layers`` cuts the depth for a smaller card, ``--forward-only``
measures the forward alone (the only flex pass CPU has).  For each attention: tokens/s (prompt +
response tokens of the examples per second, median of ``--steps`` after one warm-up), peak
memory, and the loss of the first step (both attentions see the same rows: equal losses are the
exactness check on the GPU).

    python benchmarks/train_gpu.py                 # on a CUDA machine (about 70 GB at 36 layers)
    python benchmarks/train_gpu.py --layers 12 --batch 4 --prompt 512 --response 1536
    python benchmarks/train_gpu.py --tiny --device cpu --attention sdpa   # a smoke run of the script
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch

from engine_gpu import SDAR_4B, TINY, cuda_missing, random_model
from tracerl.objectives import Example, block_sft_rows, count_response_tokens, sft_loss
from tracerl.train.optim import OptimConfig, Optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shard_alone(model, device: str) -> None:
    """FSDP2 over a process group of this one process, as train/distributed.py shards a rank's model."""
    import socket

    from tracerl.train.distributed import DistributedConfig, World, shard
    from tracerl.train.loop import POLICY_FORWARDS

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                         init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    shard(model, World(), DistributedConfig(), bf16=device.startswith("cuda"), forward_methods=POLICY_FORWARDS)


def measure(model, examples: list[Example], attention: str, *, steps: int, forward_only: bool) -> dict:
    device = model.device
    model.train_attention = attention
    rows = block_sft_rows(model, examples, torch.Generator().manual_seed(0), pad_id=model.tokenizer.pad_token_id)
    normaliser = count_response_tokens(examples)
    optimizer = None if forward_only else Optimizer(model.backbone.parameters(), OptimConfig(lr=1e-6),
                                                    total_steps=steps + 1)
    sharded = hasattr(model, "reshard")  # FSDP2 computes in bf16 through its mixed-precision policy
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" and not sharded
                else contextlib.nullcontext())
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(steps + 1):  # the first is the warm-up (compilation, allocator)
        _sync(device)
        t0 = time.perf_counter()
        if forward_only:
            with torch.no_grad(), autocast:
                loss, _ = sft_loss(model, rows, normaliser)
        else:
            with autocast:
                loss, _ = sft_loss(model, rows, normaliser)
            loss.backward()
            optimizer.step(step, float(loss.detach()))
        _sync(device)
        losses.append(float(loss.detach()))
        if step:
            times.append(time.perf_counter() - t0)
    tokens = sum(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    out = {"attention": attention, "tokens_per_s": tokens / statistics.median(times),
           "seconds_per_step": statistics.median(times), "first_loss": losses[0]}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--response", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than SDAR-4B's 36")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--attention", choices=["both", "sdpa", "flex"], default="both")
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--no-fsdp", action="store_true", help="a plain module under autocast instead of FSDP2")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape (smoke run of the script)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if cuda_missing(args.device, "train_gpu"):
        return 2
    if args.device == "cpu" and not args.forward_only and args.attention != "sdpa":
        print("train_gpu: FlexAttention has no backward pass on CPU; use --attention sdpa or --forward-only",
              file=sys.stderr)
        return 2
    shape = dict(TINY if args.tiny else SDAR_4B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    model = random_model(shape, args.device, torch.float32)
    model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not args.no_fsdp:
        shard_alone(model, args.device)
    model.train()
    g = torch.Generator().manual_seed(0)
    vocab = len(model.tokenizer) - 8  # ordinary ids of the tiny tokenizer (the rest is padded vocabulary)
    ids = torch.randint(8, vocab, (args.batch, args.prompt + args.response), generator=g).tolist()
    examples = [Example(row[: args.prompt], row[args.prompt :]) for row in ids]
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "shape": "tiny" if args.tiny else "SDAR-4B", "layers": shape["num_hidden_layers"], "batch": args.batch,
        "prompt_tokens": args.prompt, "response_tokens": args.response, "forward_only": args.forward_only,
        "fsdp2": not args.no_fsdp,
        "two_copy_row_tokens": args.prompt + 2 * args.response,
        "dense_mask_mib_per_row": (args.prompt + 2 * args.response) ** 2 / 2**20,  # one bool per pair
        "runs": [measure(model, examples, a, steps=args.steps, forward_only=args.forward_only)
                 for a in (["sdpa", "flex"] if args.attention == "both" else [args.attention])],
    }
    if len(result["runs"]) == 2:
        sdpa, flex = result["runs"]
        result["flex_over_sdpa_tokens_per_s"] = flex["tokens_per_s"] / sdpa["tokens_per_s"]
        if "peak_memory_gib" in sdpa:
            result["flex_over_sdpa_peak_memory"] = flex["peak_memory_gib"] / sdpa["peak_memory_gib"]
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
