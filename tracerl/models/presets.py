"""Tiny presets: small random-weight models for tests, the demo and CI.

Each preset is a stock transformers config of the backbone its family uses in the wild
(SDAR/TraDo are Qwen3-shaped, LLaDA is Llama-shaped, Dream is Qwen2-shaped) with the tiny
byte-level tokenizer.  Weights are drawn from a seeded generator, so ``tiny-block`` is the same
model on every machine.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers import Qwen3Config, Qwen3ForCausalLM

from tracerl.errors import CheckpointError
from tracerl.models.family import DiffusionSpec
from tracerl.models.model import DiffusionLM
from tracerl.models.tokenizer import build_tiny_tokenizer

# Shared sizes: ~0.8 M parameters, fast enough to train on two CPU cores in minutes.
_TINY = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)

PRESETS = {
    # name: (config class, model class, family, attention, default block size)
    "tiny-block": (Qwen3Config, Qwen3ForCausalLM, "block", "block", 4),
    "tiny-full": (LlamaConfig, LlamaForCausalLM, "full", "full", 8),
    "tiny-shifted": (Qwen2Config, Qwen2ForCausalLM, "shifted", "block", 4),
}


def is_preset(name: str) -> bool:
    return name in PRESETS


def build_preset(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> DiffusionLM:
    if name not in PRESETS:
        raise CheckpointError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    config_cls, model_cls, family, attention, block_size = PRESETS[name]
    tokenizer = build_tiny_tokenizer()
    extra = {"head_dim": _TINY["hidden_size"] // _TINY["num_attention_heads"]}
    if config_cls is Qwen3Config:
        extra["attention_bias"] = False
    config = config_cls(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **_TINY,
        **extra,
    )
    # Seeded, and without touching the global RNG of the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = model_cls(config)
    backbone.to(dtype).eval()
    spec = DiffusionSpec(
        family=family,
        mask_token_id=tokenizer.mask_token_id,
        block_size=block_size,
        attention=attention,
        source_layout="tracerl",
    )
    return DiffusionLM(backbone, tokenizer, spec)
