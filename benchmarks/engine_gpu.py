"""Engine throughput on a GPU for an SDAR-4B-shaped random model (the engine issue's GPU figure).

Shape: the Qwen3 configuration of SDAR-4B (hidden 2560, 36 layers, 32 heads, 8 KV heads, head
dim 128, MLP 9728, vocabulary 151936, tied embeddings), random bf16 weights made directly on the
device.  Workload: ``--batch`` requests (128) of ``--prompt`` random tokens (64), block 4, static
decoding with 4 steps per block, ``--new`` tokens each (256) with stop tokens off, so every
request decodes the same number of tokens.  Prints the engine's tokens/s and, unless
``--no-static``, static ``generate`` on the same batch, and the ratio; ``--json`` prints one JSON
line.  JetEngine's published figure for SDAR-4B at batch 128 on an H200 is 5,000+ tokens/s.

    python benchmarks/engine_gpu.py                 # on a CUDA machine
    python benchmarks/engine_gpu.py --tiny --device cpu   # a seconds-long smoke run of the script
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from tracerl.engine import Engine
from tracerl.generation import SamplingConfig, generate
from tracerl.models.family import DiffusionSpec
from tracerl.models.model import DiffusionLM
from tracerl.models.tokenizer import build_tiny_tokenizer

SDAR_4B = dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, intermediate_size=9728, vocab_size=151936)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128, vocab_size=512)


def random_model(shape: dict, device: str, dtype: torch.dtype) -> DiffusionLM:
    """A Qwen3 backbone of ``shape`` with random weights, made on ``device`` in ``dtype``."""
    tok = build_tiny_tokenizer()  # ids beyond it are padded vocabulary rows: never sampled
    config = Qwen3Config(**shape, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         attention_bias=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            backbone = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    spec = DiffusionSpec(family="block", mask_token_id=tok.mask_token_id, block_size=4, attention="block")
    return DiffusionLM(backbone.eval(), tok, spec)


def cuda_missing(device: str, script: str) -> bool:
    """True (after one line on stderr) when ``device`` asks for CUDA and this machine has none."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"{script}: no CUDA device here (use --device cpu --tiny for a smoke run)", file=sys.stderr)
        return True
    return False


def _timed(fn) -> tuple[float, list]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--tiny", action="store_true", help="a tiny shape (smoke run of the script)")
    ap.add_argument("--no-static", action="store_true", help="skip the static generate() run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if cuda_missing(args.device, "engine_gpu"):
        return 2
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = random_model(TINY if args.tiny else SDAR_4B, args.device, dtype)
    rng = random.Random(0)
    prompts = [[rng.randrange(32, 127) for _ in range(args.prompt)] for _ in range(args.batch)]
    config = SamplingConfig(max_new_tokens=args.new, steps=4, strategy="static", stop_token_ids=())
    engine = Engine(model, max_running=args.batch)
    with torch.inference_mode():
        engine.generate(prompts[:2], SamplingConfig(max_new_tokens=8, stop_token_ids=()))  # warm-up
        seconds, out = _timed(lambda: engine.generate(prompts, config))
        result = {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
            "shape": "tiny" if args.tiny else "SDAR-4B",
            "dtype": str(dtype).removeprefix("torch."),
            "batch": args.batch, "prompt_tokens": args.prompt, "new_tokens": args.new,
            "engine_tokens_per_s": sum(len(g.response_ids) for g in out) / seconds,
            "engine_seconds": seconds,
            "slot_occupancy": engine.stats.slot_occupancy,
        }
        if not args.no_static:
            static_s, ref = _timed(lambda: generate(model, prompts, config))
            result["static_tokens_per_s"] = sum(len(g.response_ids) for g in ref) / static_s
            result["engine_vs_static"] = static_s / seconds
            result["identical"] = all(a.response_ids == b.response_ids for a, b in zip(out, ref))
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
