"""``tracerl bench engine``: the continuous-batching engine against static ``generate`` batches.

Workload (the engine issue's): ``requests`` prompts of 16-256 random printable bytes, a response
cap of 512 tokens, at most 64 requests running at once, sampled at temperature 1 with a seed per
request so both sides draw the same streams.  The response lengths are set by two stop tokens
whose combined probability under the random tiny model is about 1/126 per token, so lengths
spread from a few tokens to the cap (geometric, mean about 125, roughly 2% hit the cap).  The
static side runs ``generate`` in batches of ``max_running`` in submission order: each batch
decodes until its longest response ends.  Both sides decode the same requests with the same
seeds; ``identical`` says whether every output (tokens, step map, nfe, finish reason) matched.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time

import torch

from tracerl.engine import Engine
from tracerl.generation import SamplingConfig, generate
from tracerl.models import load_model
from tracerl.progress import ProgressReporter

# Two byte ids of the tiny tokenizer, each drawn about once per 250 tokens by the random tiny
# models at temperature 1 (measured on tiny-block): stop probability about 1/126 per token.
BENCH_STOP_IDS = (144, 229)


def workload(requests: int, vocab: int, seed: int = 0, shortest: int = 16, longest: int = 256):
    rng = random.Random(seed)
    prompts = [[rng.randrange(32, 127) % vocab for _ in range(rng.randint(shortest, longest))]
               for _ in range(requests)]
    seeds = [rng.randrange(2**63) for _ in range(requests)]
    return prompts, seeds


def _same(a, b) -> bool:
    drop = dict(logprobs=None, confidences=None)
    return dataclasses.replace(a, **drop) == dataclasses.replace(b, **drop)


def bench_engine(model_name: str = "tiny-block", device: str = "cpu", quick: bool = False,
                 requests: int | None = None, max_running: int | None = None, cap: int | None = None,
                 progress: bool | str = False) -> dict:
    requests = requests or (24 if quick else 256)
    max_running = max_running or (8 if quick else 64)
    cap = cap or (64 if quick else 512)
    torch.manual_seed(0)
    model = load_model(model_name, device=device)
    prompts, seeds = workload(requests, model.vocab_size, shortest=16, longest=64 if quick else 256)
    config = SamplingConfig(max_new_tokens=cap, temperature=1.0, stop_token_ids=BENCH_STOP_IDS)
    generate(model, prompts[:2], dataclasses.replace(config, max_new_tokens=8), seeds=seeds[:2])  # warm-up

    # Progress counts requests of both runs: the static batches first, then the engine's.
    with ProgressReporter("bench engine", 2 * requests, unit="req", progress=progress) as bar:
        bar.update(run="static")
        t0 = time.perf_counter()
        static = []
        for i in range(0, requests, max_running):
            static += generate(model, prompts[i:i + max_running], config, seeds=seeds[i:i + max_running])
            bar.update(len(static))
        static_s = time.perf_counter() - t0

        engine = Engine(model, max_running=max_running)
        bar.update(run="engine")
        t0 = time.perf_counter()
        out = engine.generate(prompts, config, seeds=seeds, progress=lambda n: bar.update(advance=n))
        engine_s = time.perf_counter() - t0

    tokens = sum(len(g.response_ids) for g in out)
    static_tokens = sum(len(g.response_ids) for g in static)
    lengths = [len(g.response_ids) for g in out]
    same = sum(_same(a, b) for a, b in zip(out, static))
    st = engine.stats
    return {
        "model": model_name,
        "device": device,
        "requests": requests,
        "max_running": max_running,
        "max_new_tokens": cap,
        "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
        "response_tokens": {"mean": statistics.fmean(lengths), "min": min(lengths), "max": max(lengths),
                            "at_cap": sum(g.finish_reason == "length" for g in out)},
        "speedup_vs_static": static_s / engine_s,
        "tokens_per_s": tokens / engine_s,
        "static_tokens_per_s": static_tokens / static_s,
        "engine_seconds": engine_s,
        "static_seconds": static_s,
        "forward_fraction": st.forward_fraction,
        "slot_occupancy": st.slot_occupancy,
        "forwards": st.forwards,
        "model_calls": st.model_calls,
        "kv_bytes_per_token": engine.kv_bytes_per_token,
        "identical": same == requests,
        "identical_requests": same,
    }


def format_engine_table(r: dict) -> str:
    lens = r["response_tokens"]
    return "\n".join([
        f"tracerl bench engine: {r['model']} on {r['device']}, {r['requests']} requests (prompts "
        f"{r['prompt_tokens'][0]}-{r['prompt_tokens'][1]} tokens, responses {lens['min']}-{lens['max']}, "
        f"mean {lens['mean']:.0f}, {lens['at_cap']} at the cap {r['max_new_tokens']}), "
        f"at most {r['max_running']} running",
        f"{'':8s} {'tokens/s':>10s} {'seconds':>8s}",
        f"{'static':8s} {r['static_tokens_per_s']:10.1f} {r['static_seconds']:8.2f}",
        f"{'engine':8s} {r['tokens_per_s']:10.1f} {r['engine_seconds']:8.2f}",
        f"speedup_vs_static {r['speedup_vs_static']:.2f}, forward_fraction {r['forward_fraction']:.3f} "
        f"(time in model calls), slot_occupancy {r['slot_occupancy']:.3f}, "
        f"KV cache {r['kv_bytes_per_token']} bytes/token, identical outputs "
        f"{r['identical_requests']}/{r['requests']}",
    ])
