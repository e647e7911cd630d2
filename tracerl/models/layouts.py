"""Checkpoint layouts we can read, and how each maps onto a stock transformers backbone.

A layout is recognised by ``model_type`` in ``config.json``.  It says which transformers class
holds the weights, how to translate the config fields and parameter names, and the diffusion
defaults (family, attention, mask token, block size).  Facts about the upstream layouts were read
from the public modeling/config files of each model (cited per layout below).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from tracerl.errors import CheckpointError

# config.json keys that describe the file, not the architecture.
_META_KEYS = {
    "model_type", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype",
    "_name_or_path", "tracerl", "use_cache",
    # SDAR's config.json asks for flex_attention (a GPU kernel); we choose attention ourselves.
    "attn_implementation", "_attn_implementation",
}


def _identity(name: str) -> str:
    return name


@dataclass(frozen=True)
class Layout:
    name: str
    backbone_type: str  # "llama" | "qwen2" | "qwen3": the transformers class holding the weights
    family: str
    attention: str
    block_size: int
    # Where to find the mask token: config field, tokenizer token names, then a fixed default id.
    mask_token_names: tuple[str, ...]
    default_mask_id: int | None
    # Whether a missing mask token may be added (plain causal LMs being adapted to diffusion).
    may_add_mask_token: bool
    translate_config: Callable[[dict, str], dict]
    rename: Callable[[str], str]  # checkpoint name -> backbone name
    checkpoint_name: Callable[[str], str] = _identity  # backbone name -> checkpoint name


def _hf_native_config(data: dict, where: str) -> dict:
    """Layouts whose config.json already uses transformers' field names (Qwen2/Qwen3 shaped)."""
    kept = {k: v for k, v in data.items() if k not in _META_KEYS}
    if kept.get("rope_scaling", 0) is None:
        del kept["rope_scaling"]  # explicit null: transformers v5 warns; it means "no scaling"
    return kept


# --- LLaDA ---------------------------------------------------------------------------------
# LLaDA (GSAI-ML/LLaDA-8B-*, configuration_llada.py / modeling_llada.py) is an OLMo-derived
# code base: a Llama block with its own parameter names.  ff_proj is the gated (activated)
# branch, up_proj the linear branch, ff_out the down projection; the head is transformer.ff_out
# unless weight_tying.
_LLADA_NAMES = [  # (LLaDA name, transformers Llama name); {i} = layer, {p} = weight|bias
    ("model.transformer.wte.weight", "model.embed_tokens.weight"),
    ("model.transformer.ln_f.weight", "model.norm.weight"),
    ("model.transformer.ff_out.weight", "lm_head.weight"),
    ("model.transformer.blocks.{i}.q_proj.{p}", "model.layers.{i}.self_attn.q_proj.{p}"),
    ("model.transformer.blocks.{i}.k_proj.{p}", "model.layers.{i}.self_attn.k_proj.{p}"),
    ("model.transformer.blocks.{i}.v_proj.{p}", "model.layers.{i}.self_attn.v_proj.{p}"),
    ("model.transformer.blocks.{i}.attn_out.{p}", "model.layers.{i}.self_attn.o_proj.{p}"),
    ("model.transformer.blocks.{i}.ff_proj.{p}", "model.layers.{i}.mlp.gate_proj.{p}"),
    ("model.transformer.blocks.{i}.up_proj.{p}", "model.layers.{i}.mlp.up_proj.{p}"),
    ("model.transformer.blocks.{i}.ff_out.{p}", "model.layers.{i}.mlp.down_proj.{p}"),
    ("model.transformer.blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("model.transformer.blocks.{i}.ff_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
]
LLADA_MASK_ID = 126336


class NameMap:
    """A two-way table of parameter-name templates (``{i}`` layer index, ``{p}`` weight/bias), so
    errors can name a tensor the way the checkpoint's own files do."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._forward = [(self._regex(a), b) for a, b in pairs]
        self._backward = [(self._regex(b), a) for a, b in pairs]

    @staticmethod
    def _regex(template: str) -> re.Pattern:
        pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
        return re.compile(f"^{pattern}$")

    @staticmethod
    def _apply(table, name: str) -> str:
        for regex, template in table:
            m = regex.match(name)
            if m:
                return template.format(**m.groupdict())
        return name  # unknown names pass through; the loader reports them

    def to_backbone(self, name: str) -> str:
        return self._apply(self._forward, name)

    def to_checkpoint(self, name: str) -> str:
        return self._apply(self._backward, name)


_LLADA_MAP = NameMap(_LLADA_NAMES)


def _llada_config(data: dict, where: str) -> dict:
    def need(key: str):
        if key not in data:
            raise CheckpointError(f"{where}: LLaDA config lacks {key!r}")
        return data[key]

    if data.get("include_qkv_bias") and not data.get("include_bias"):
        raise CheckpointError(
            f"{where}: include_qkv_bias without include_bias is not supported (Llama backbones "
            "have bias on all four attention projections or none)"
        )
    if data.get("block_type", "llama") != "llama":
        raise CheckpointError(f"{where}: LLaDA block_type {data['block_type']!r}; only 'llama' is supported")
    if data.get("layer_norm_type", "rms") != "rms":
        raise CheckpointError(f"{where}: layer_norm_type {data['layer_norm_type']!r}; only 'rms' is supported")
    if data.get("activation_type", "silu") not in ("silu", "swiglu"):
        raise CheckpointError(f"{where}: activation_type {data['activation_type']!r}; only silu is supported")
    for flag in ("alibi", "attention_layer_norm", "scale_logits", "input_emb_norm"):
        if data.get(flag):
            raise CheckpointError(f"{where}: LLaDA option {flag}=true is not supported")
    d_model = need("d_model")
    n_heads = need("n_heads")
    # mlp_hidden_size wins over mlp_ratio (the released configs disagree: 12288 vs 4 x 4096).
    intermediate = data.get("mlp_hidden_size") or int(data.get("mlp_ratio", 4) * d_model)
    return {
        "hidden_size": d_model,
        "num_attention_heads": n_heads,
        "num_key_value_heads": data.get("n_kv_heads") or n_heads,
        "head_dim": d_model // n_heads,
        "num_hidden_layers": need("n_layers"),
        "intermediate_size": intermediate,
        "vocab_size": data.get("embedding_size") or need("vocab_size"),
        "max_position_embeddings": data.get("max_sequence_length", 4096),
        "rope_theta": data.get("rope_theta", 10000.0),
        "rms_norm_eps": data.get("rms_norm_eps", 1e-5),
        "tie_word_embeddings": bool(data.get("weight_tying", False)),
        "attention_bias": bool(data.get("include_bias", False)),
        "mlp_bias": bool(data.get("include_bias", False)),
        "hidden_act": "silu",
        "pad_token_id": data.get("pad_token_id"),
        "eos_token_id": data.get("eos_token_id"),
        "bos_token_id": data.get("bos_token_id"),
    }


LAYOUTS: dict[str, Layout] = {
    # SDAR / TraDo (JetLM/SDAR-*-Chat, Gen-Verse/TraDo-*): Qwen3-shaped weights and config
    # fields, model_type "sdar", block diffusion with block size 4, mask token <|MASK|>.
    "sdar": Layout(
        "sdar", "qwen3", "block", "block", 4, ("<|MASK|>",), None, False,
        _hf_native_config, _identity,
    ),
    # Dream (Dream-org/Dream-v0-*-7B): Qwen2-shaped weights, model_type "Dream", AR-initialised
    # (shifted logits), bidirectional attention, mask id in config.mask_token_id (<|mask|>).
    "dream": Layout(
        "dream", "qwen2", "shifted", "full", 32, ("<|mask|>",), None, False,
        _hf_native_config, _identity,
    ),
    "llada": Layout(
        "llada", "llama", "full", "full", 32, ("<|mdm_mask|>",), LLADA_MASK_ID, False,
        _llada_config, _LLADA_MAP.to_backbone, _LLADA_MAP.to_checkpoint,
    ),
    # Plain causal LMs, adapted to diffusion: shifted family with block-causal attention, which
    # with block size 1 is exactly the causal attention they were trained with.
    **{
        t: Layout(t, t, "shifted", "block", 4, ("<|mask|>", "<|MASK|>", "<mask>"), None, True,
                  _hf_native_config, _identity)
        for t in ("llama", "qwen2", "qwen3")
    },
}


def layout_for_model_type(model_type: str | None, where: str) -> Layout:
    key = (model_type or "").lower()
    if key not in LAYOUTS:
        raise CheckpointError(
            f"{where}: unknown model_type {model_type!r}; supported: "
            f"{', '.join(sorted(LAYOUTS))} (or a tracerl checkpoint)"
        )
    return LAYOUTS[key]
