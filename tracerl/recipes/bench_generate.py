"""Benchmarks behind ``tracerl bench``.  Figures are measured in one run and reported as ratios
where a target exists; nothing here is asserted by the test suite."""

from __future__ import annotations

import random
import time

import torch

from tracerl.generation import GenerationStats, SamplingConfig, generate
from tracerl.models import load_model
from tracerl.progress import ProgressReporter


def _random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(32, 127) % vocab for _ in range(length)] for _ in range(batch)]


def _run(model, prompts, config: SamplingConfig) -> dict:
    stats = GenerationStats()
    t0 = time.perf_counter()
    results = generate(model, prompts, config, stats=stats)
    wall = time.perf_counter() - t0
    tokens = sum(len(r.response_ids) for r in results)
    return {
        "seconds": wall,
        "new_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "nfe_per_token": sum(r.nfe for r in results) / max(1, tokens),
        "forward_fraction": stats.forward_seconds / wall,
        "forwards": stats.forwards,
    }


def bench_generate(model_name: str = "tiny-block", device: str = "cpu", quick: bool = False,
                   progress: bool | str = False) -> dict:
    """Tokens/s, NFE per token, time share inside forwards, and the KV-cache speed-up.

    Prompt 128 tokens, 256 new tokens (quick: 32 and 32), greedy static decoding with one token
    per step, stop tokens disabled so every run generates the same number of tokens.
    """
    prompt_len, new_tokens = (32, 32) if quick else (128, 256)
    batches = (1, 4) if quick else (1, 32)
    torch.manual_seed(0)
    model = load_model(model_name, device=device)
    runs: dict[str, dict] = {}
    with ProgressReporter("bench generate", 2 * len(batches), unit="run", progress=progress) as bar:
        for batch in batches:
            prompts = _random_prompts(batch, prompt_len, model.vocab_size, seed=batch)
            for use_cache in (True, False):
                config = SamplingConfig(max_new_tokens=new_tokens, use_cache=use_cache, stop_token_ids=())
                generate(model, prompts[:1], SamplingConfig(max_new_tokens=8, stop_token_ids=()))  # warm-up
                name = f"batch{batch}_{'cache' if use_cache else 'nocache'}"
                runs[name] = _run(model, prompts, config)
                bar.update(advance=1, last=name, tokens_per_s=runs[name]["tokens_per_s"])
    for batch in batches:
        runs[f"batch{batch}_cache"]["cache_speedup"] = (
            runs[f"batch{batch}_nocache"]["seconds"] / runs[f"batch{batch}_cache"]["seconds"]
        )
    main = runs[f"batch{batches[-1]}_cache"]
    return {
        "model": model_name,
        "device": device,
        "batch": batches[-1],
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "tokens_per_s": main["tokens_per_s"],
        "nfe_per_token": main["nfe_per_token"],
        "forward_fraction": main["forward_fraction"],
        "cache_speedup": main["cache_speedup"],
        "runs": runs,
    }


def format_generate_table(result: dict) -> str:
    head = f"{'run':18s} {'tokens/s':>10s} {'nfe/token':>10s} {'fwd frac':>9s} {'seconds':>8s} {'cache x':>8s}"
    lines = [f"tracerl bench generate: {result['model']} on {result['device']}, prompt "
             f"{result['prompt_tokens']} + {result['new_tokens']} new tokens", head]
    for name, r in result["runs"].items():
        speed = f"{r['cache_speedup']:.2f}" if "cache_speedup" in r else ""
        lines.append(f"{name:18s} {r['tokens_per_s']:10.1f} {r['nfe_per_token']:10.3f} "
                     f"{r['forward_fraction']:9.3f} {r['seconds']:8.2f} {speed:>8s}")
    return "\n".join(lines)
