"""Tiny random-weight checkpoints in the *upstream* layouts of SDAR/TraDo, LLaDA and Dream.

Test-support module (it holds no tests).  Each ``write_*_checkpoint(folder)`` writes, into
``folder``, what a Hugging Face snapshot of the real model looks like to a loader:

* ``config.json`` with the real field names, ``model_type``, ``architectures`` and ``auto_map``
  (only the sizes are shrunk: hidden 32, 2 layers, 4 heads, 2 KV heads, MLP 64; the vocabulary /
  embedding sizes are the real ones so the special tokens can sit at their real ids);
* ``model.safetensors`` with the real parameter names and random float32 weights;
* ``generation_config.json`` as the real repos ship it;
* a tokenizer (``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``) whose
  special tokens sit at their REAL ids.  It is a byte-level BPE with no merges: ids 0..255 are the
  256 byte symbols, every other id below the last special token is a filler ``<|reserved_i|>``.

What is *not* reproduced: the remote-code files the ``auto_map`` points at
(``modeling_*.py`` / ``configuration_*.py`` / ``tokenization_dream.py``) -- a loader must not need
them -- and Dream's tokenizer format (the real repo ships ``vocab.json`` + ``merges.txt`` for its
custom ``DreamTokenizer``, no ``tokenizer.json``; here it is a fast tokenizer like the others).

Sources (public code read for every layout fact; "DARE" = github.com/hxhcreate/DARE, which vendors
the HF repos' files under ``models/``):

* SDAR: ``JetAstra/SDAR: training/model/SDAR-4B-Chat/modeling_sdar.py`` (module tree = Qwen3),
  ``DARE: models/SDAR-1dot7B-Chat/config.json`` (config fields verbatim),
  ``darkshapes/divisor: divisor/trado/configuration_sdar.py`` (SDARConfig),
  ``JetAstra/SDAR: generate.py`` (mask = ``tokenizer.mask_token``, ``<|MASK|>``).
* LLaDA: ``DARE: models/LLaDA-8B-Instruct/{config.json,configuration_llada.py,modeling_llada.py,
  generation_config.json}``; parameter names cross-checked with llama.cpp's converter
  (``ff_proj`` -> ffn_gate) and an MLX adapter that lists the checkpoint's tensor names.
* Dream: ``megumi-ben/dlm-infra-rag: dream/model/modeling_dream.py`` and
  ``ZHZisZZ/dllm-trainer: dllm/pipelines/dream/models/{configuration_dream.py,
  tokenization_dream.py}`` (copies of the HF repo's remote code),
  ``monash-yann/dllm-research: models/Dream-7B-Instruct/generation_config.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Tiny sizes shared by the three fixtures.
HIDDEN = 32
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 64

# --------------------------------------------------------------------------------------------
# Special tokens at their real ids: (id, content, special).  "special" is the flag of the real
# tokenizer's added_tokens_decoder (Qwen marks tool/think/FIM tokens as non-special).
# --------------------------------------------------------------------------------------------

# Qwen2.5 added tokens 151643..151664 (shared by Qwen3, SDAR/TraDo and Dream).
_QWEN25_ADDED: list[tuple[int, str, bool]] = [
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
]

# SDAR/TraDo = Qwen3 tokenizer (Qwen2.5's + 4 tool/think tokens) + <|MASK|> at 151669.
SDAR_ADDED = _QWEN25_ADDED + [
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
    (151669, "<|MASK|>", True),
]

# LLaDA (its own 126k vocabulary, Llama-3-style chat tokens).  <|mdm_mask|> 126336 is special,
# normalized=False (added_tokens_decoder entry quoted in public code); the chat tokens are those
# LLaDA's samplers treat as end-of-text / end-of-turn (126081, 126348).
LLADA_ADDED: list[tuple[int, str, bool]] = [
    (126080, "<|startoftext|>", True),
    (126081, "<|endoftext|>", True),
    (126336, "<|mdm_mask|>", True),
    (126346, "<|start_header_id|>", True),
    (126347, "<|end_header_id|>", True),
    (126348, "<|eot_id|>", True),
]

# Dream = Qwen2.5 tokenizer + <|beginoftext|> 151665 + <|mask|> 151666.
DREAM_ADDED = _QWEN25_ADDED + [
    (151665, "<|beginoftext|>", True),
    (151666, "<|mask|>", True),
]

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# LLaDA-8B-Instruct's template (Llama-3 style, starting with <|startoftext|>).
_LLADA_TEMPLATE = (
    "{{ '<|startoftext|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] "
    "+ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


# --------------------------------------------------------------------------------------------
# Shared writers
# --------------------------------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for bytes 0..255, in byte order (the ByteLevel alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def _write_tokenizer(
    folder: Path,
    added: list[tuple[int, str, bool]],
    *,
    bos: str | None,
    eos: str,
    pad: str | None,
    mask: str | None,
    chat_template: str,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE (no merges) with ``added`` at their ids; saved the way HF saves it."""
    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    by_id = {i: content for i, content, _ in added}
    for i in range(256, max(by_id) + 1):
        vocab[by_id.get(i, f"<|reserved_{i}|>")] = i
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    # The contents already have vocab entries, so registering them keeps their ids.
    backend.add_special_tokens(
        [AddedToken(c, special=True, normalized=False) for _, c, s in added if s])
    backend.add_tokens(
        [AddedToken(c, special=False, normalized=False) for _, c, s in added if not s])
    for i, content, _ in added:
        assert backend.token_to_id(content) == i, (content, i)

    named = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "mask_token": mask}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, **{k: v for k, v in named.items() if v is not None})
    tok.chat_template = chat_template
    tok.save_pretrained(str(folder))
    # transformers 5 no longer writes special_tokens_map.json; write it as v4 did.
    stm = folder / "special_tokens_map.json"
    if not stm.exists():
        _write_json(stm, {k: _added_token_entry(v) for k, v in named.items() if v is not None})
    return tok


def _added_token_entry(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


class _Weights:
    """Deterministic random tensors, drawn in call order from one seeded generator."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.tensors: dict[str, torch.Tensor] = {}

    def linear(self, name: str, out_f: int, in_f: int, bias: bool = False) -> None:
        std = 1.0 / math.sqrt(in_f)
        self.tensors[f"{name}.weight"] = torch.randn(out_f, in_f, generator=self.gen) * std
        if bias:
            self.tensors[f"{name}.bias"] = torch.randn(out_f, generator=self.gen) * 0.1

    def embedding(self, name: str, rows: int, dim: int) -> None:
        self.tensors[f"{name}.weight"] = torch.randn(rows, dim, generator=self.gen)

    def norm(self, name: str, dim: int) -> None:
        # Not all ones, so that swapping two norms changes the output.
        self.tensors[f"{name}.weight"] = 1.0 + 0.1 * torch.randn(dim, generator=self.gen)

    def save(self, folder: Path) -> dict[str, torch.Tensor]:
        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return tensors


def _prepare(folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------------------------
# SDAR / TraDo  (family "block")
# --------------------------------------------------------------------------------------------

SDAR_MASK_ID = 151669


def write_sdar_checkpoint(folder: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """An SDAR-1.7B-Chat-shaped checkpoint (TraDo-4B/8B-Instruct share the layout).

    Layout = Qwen3 (modeling_sdar.py is generated from transformers' modeling_qwen3.py):
    ``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v,o}_proj`` (bias only if
    ``attention_bias``, False in the real configs), per-head ``self_attn.{q,k}_norm`` of size
    ``head_dim``, ``mlp.{gate,up,down}_proj`` (down(act(gate(x)) * up(x))), ``input_layernorm``,
    ``post_attention_layernorm``, ``model.norm``, ``lm_head`` (untied: tie_word_embeddings false).
    ``head_dim`` is explicit and here differs from hidden/heads (16 vs 8), as in SDAR-4B/8B
    (Qwen3-4B/8B: head_dim 128, hidden/heads 80/128), so a loader must honour it.
    """
    folder = _prepare(folder)
    head_dim = 16
    vocab_size = 151936
    # Field set and values of DARE: models/SDAR-1dot7B-Chat/config.json, sizes shrunk.
    config: dict[str, Any] = {
        "architectures": ["SDARForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_sdar.SDARConfig",
            "AutoModel": "modeling_sdar.SDARModel",
            "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_implementation": "flex_attention",
        "bos_token_id": 151643,
        "debug": False,
        "eos_token_id": 151643,
        "block_size": 4,
        "mask_token_id": SDAR_MASK_ID,
        "ep_size": 1,
        "fuse_cross_entropy": True,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 32768,
        "max_window_layers": LAYERS,
        "micro_forward": False,
        "model_type": "sdar",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "skip_checkpoint": False,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",  # real: "bfloat16"; the tiny weights are float32
        "transformers_version": "4.52.4",
        "use_cache": False,
        "use_deepep": False,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": 151643, "eos_token_id": 151643,
        "transformers_version": "4.52.4", "use_cache": False,
    })

    w = _Weights(seed)
    w.embedding("model.embed_tokens", vocab_size, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        w.linear(f"{p}.self_attn.q_proj", HEADS * head_dim, HIDDEN)
        w.linear(f"{p}.self_attn.k_proj", KV_HEADS * head_dim, HIDDEN)
        w.linear(f"{p}.self_attn.v_proj", KV_HEADS * head_dim, HIDDEN)
        w.linear(f"{p}.self_attn.o_proj", HIDDEN, HEADS * head_dim)
        w.norm(f"{p}.self_attn.q_norm", head_dim)
        w.norm(f"{p}.self_attn.k_norm", head_dim)
        w.linear(f"{p}.mlp.gate_proj", INTERMEDIATE, HIDDEN)
        w.linear(f"{p}.mlp.up_proj", INTERMEDIATE, HIDDEN)
        w.linear(f"{p}.mlp.down_proj", HIDDEN, INTERMEDIATE)
        w.norm(f"{p}.input_layernorm", HIDDEN)
        w.norm(f"{p}.post_attention_layernorm", HIDDEN)
    w.norm("model.norm", HIDDEN)
    w.linear("lm_head", vocab_size, HIDDEN)
    state_dict = w.save(folder)

    # Qwen3 chat tokenizer + mask token (SDAR's generate.py reads tokenizer.mask_token).
    tok = _write_tokenizer(folder, SDAR_ADDED, bos=None, eos="<|endoftext|>",
                           pad="<|endoftext|>", mask="<|MASK|>", chat_template=_CHATML)
    return {
        "family": "block",
        "source_layout": "sdar",
        "folder": folder,
        "mask_token": "<|MASK|>",
        "mask_token_id": SDAR_MASK_ID,
        "eos_token_id": 151643,
        "pad_token_id": 151643,
        "bos_token_id": 151643,
        "turn_end_token_id": 151645,  # <|im_end|>
        "block_size": 4,
        "num_embeddings": vocab_size,
        "tokenizer_len": len(tok),
        "config": config,
        "state_dict": state_dict,
    }


# --------------------------------------------------------------------------------------------
# LLaDA  (family "full")
# --------------------------------------------------------------------------------------------

LLADA_MASK_ID = 126336


def write_llada_checkpoint(folder: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """A GSAI-ML/LLaDA-8B-Instruct-shaped checkpoint (LLaDA-8B-Base has the same layout).

    Parameter names (modeling_llada.py: LLaDAModelLM.model = LLaDAModel, whose ``transformer``
    ModuleDict holds wte / blocks / ln_f / ff_out; block_type "llama" = LLaDALlamaBlock):
    ``model.transformer.wte``, ``model.transformer.blocks.N.{attn_norm, q_proj, k_proj, v_proj,
    attn_out, ff_norm, ff_proj, up_proj, ff_out}``, ``model.transformer.ln_f``,
    ``model.transformer.ff_out`` (output head, present because weight_tying is false).
    No biases (include_bias / include_qkv_bias false, bias_for_layer_norm false), no q/k norms
    (attention_layer_norm false).  MLP: ff_out(act(ff_proj(x)) * up_proj(x)) -- ff_proj is the
    gated (Llama gate_proj) branch.
    """
    folder = _prepare(folder)
    vocab_size = 126464
    # Field set and values of LLaDA-8B-Instruct's config.json (DARE copy; its extra
    # "flash_attn_varlen" key is a local addition and left out), sizes shrunk.  mlp_ratio is kept
    # while mlp_hidden_size is set (as upstream: 4 * 4096 != 12288): the latter wins.
    config: dict[str, Any] = {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": HIDDEN,
        "embedding_dropout": 0.0,
        "embedding_size": vocab_size,
        "eos_token_id": 126081,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": LLADA_MASK_ID,
        "max_sequence_length": 4096,
        "mlp_hidden_size": INTERMEDIATE,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": HEADS,
        "n_kv_heads": KV_HEADS,  # real: 32 (= n_heads); GQA here to exercise the grouping
        "n_layers": LAYERS,
        "pad_token_id": 126081,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "torch_dtype": "float32",  # real: "bfloat16"
        "transformers_version": "4.46.3",
        "use_cache": False,
        "vocab_size": vocab_size,
        "weight_tying": False,
    }
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", {
        "_from_model_config": True, "eos_token_id": 126081, "pad_token_id": 126081,
        "transformers_version": "4.46.3", "use_cache": False,
    })

    head_dim = HIDDEN // HEADS
    w = _Weights(seed)
    w.embedding("model.transformer.wte", vocab_size, HIDDEN)
    for i in range(LAYERS):
        p = f"model.transformer.blocks.{i}"
        w.norm(f"{p}.attn_norm", HIDDEN)
        w.linear(f"{p}.q_proj", HIDDEN, HIDDEN)
        w.linear(f"{p}.k_proj", KV_HEADS * head_dim, HIDDEN)
        w.linear(f"{p}.v_proj", KV_HEADS * head_dim, HIDDEN)
        w.linear(f"{p}.attn_out", HIDDEN, HIDDEN)
        w.norm(f"{p}.ff_norm", HIDDEN)
        w.linear(f"{p}.ff_proj", INTERMEDIATE, HIDDEN)
        w.linear(f"{p}.up_proj", INTERMEDIATE, HIDDEN)
        w.linear(f"{p}.ff_out", HIDDEN, INTERMEDIATE)
    w.norm("model.transformer.ln_f", HIDDEN)
    w.linear("model.transformer.ff_out", vocab_size, HIDDEN)
    state_dict = w.save(folder)

    # LLaDA ships a plain fast tokenizer; its mask id lives in config.json (mask_token_id), the
    # tokenizer declares bos/eos but no mask_token.
    tok = _write_tokenizer(folder, LLADA_ADDED, bos="<|startoftext|>", eos="<|endoftext|>",
                           pad="<|endoftext|>", mask=None, chat_template=_LLADA_TEMPLATE)
    return {
        "family": "full",
        "source_layout": "llada",
        "folder": folder,
        "mask_token": "<|mdm_mask|>",
        "mask_token_id": LLADA_MASK_ID,
        "eos_token_id": 126081,
        "pad_token_id": 126081,
        "bos_token_id": 126080,
        "turn_end_token_id": 126348,  # <|eot_id|>
        "num_embeddings": vocab_size,
        "tokenizer_len": len(tok),
        "config": config,
        "state_dict": state_dict,
    }


# --------------------------------------------------------------------------------------------
# Dream  (family "shifted")
# --------------------------------------------------------------------------------------------

DREAM_MASK_ID = 151666


def write_dream_checkpoint(folder: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """A Dream-org/Dream-v0-Instruct-7B-shaped checkpoint (Dream-v0-Base-7B: same layout).

    Layout = Qwen2 (modeling_dream.py: DreamModel.model = DreamBaseModel, + lm_head):
    ``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v}_proj`` WITH bias (hard-coded
    ``bias=True``), ``self_attn.o_proj`` without bias, ``mlp.{gate,up,down}_proj``,
    ``input_layernorm``, ``post_attention_layernorm``, ``model.norm``, ``lm_head`` (untied).
    head_dim = hidden_size // num_attention_heads (DreamConfig has no head_dim field).  The
    per-layer ``rotary_emb.inv_freq`` buffers are non-persistent, so not in the checkpoint.
    Only differences from a stock Qwen2: bidirectional attention and shifted logits (the logit
    at position i-1 predicts token i).
    """
    folder = _prepare(folder)
    vocab_size = 152064  # Qwen2.5-7B's embedding rows (the 0.5B-3B Qwen2.5 models have 151936)
    head_dim = HIDDEN // HEADS
    # DreamConfig fields (configuration_dream.py) with the values of Dream-v0-Instruct-7B, sizes
    # shrunk.  bos/eos/pad = 151643 as in its generation_config.json (_from_model_config).
    config: dict[str, Any] = {
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel",
        },
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "mask_token_id": DREAM_MASK_ID,
        "max_position_embeddings": 131072,
        "max_window_layers": LAYERS,
        "model_type": "Dream",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "pad_token_id": 151643,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",  # real: "bfloat16"
        "transformers_version": "4.46.2",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }
    _write_json(folder / "config.json", config)
    # Verbatim shape of Dream-v0-Instruct-7B's generation_config.json (DreamGenerationConfig).
    _write_json(folder / "generation_config.json", {
        "_from_model_config": True, "alg": "origin", "alg_temp": None, "bos_token_id": 151643,
        "eos_token_id": 151643, "eps": 0.001, "mask_token_id": None, "output_history": False,
        "pad_token_id": 151643, "steps": 512, "temperature": 0.0, "top_k": None, "top_p": None,
        "transformers_version": "4.46.2",
    })

    w = _Weights(seed)
    w.embedding("model.embed_tokens", vocab_size, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        w.linear(f"{p}.self_attn.q_proj", HEADS * head_dim, HIDDEN, bias=True)
        w.linear(f"{p}.self_attn.k_proj", KV_HEADS * head_dim, HIDDEN, bias=True)
        w.linear(f"{p}.self_attn.v_proj", KV_HEADS * head_dim, HIDDEN, bias=True)
        w.linear(f"{p}.self_attn.o_proj", HIDDEN, HEADS * head_dim)
        w.linear(f"{p}.mlp.gate_proj", INTERMEDIATE, HIDDEN)
        w.linear(f"{p}.mlp.up_proj", INTERMEDIATE, HIDDEN)
        w.linear(f"{p}.mlp.down_proj", HIDDEN, INTERMEDIATE)
        w.norm(f"{p}.input_layernorm", HIDDEN)
        w.norm(f"{p}.post_attention_layernorm", HIDDEN)
    w.norm("model.norm", HIDDEN)
    w.linear("lm_head", vocab_size, HIDDEN)
    state_dict = w.save(folder)

    # DreamTokenizer defaults: eos = pad = <|endoftext|>; Dream's tokenizer_config adds
    # bos <|beginoftext|> and mask <|mask|>.
    tok = _write_tokenizer(folder, DREAM_ADDED, bos="<|beginoftext|>", eos="<|endoftext|>",
                           pad="<|endoftext|>", mask="<|mask|>", chat_template=_CHATML)
    return {
        "family": "shifted",
        "source_layout": "dream",
        "folder": folder,
        "mask_token": "<|mask|>",
        "mask_token_id": DREAM_MASK_ID,
        "eos_token_id": 151643,
        "pad_token_id": 151643,
        "bos_token_id": 151665,  # the tokenizer's bos; config.json says 151643
        "turn_end_token_id": 151645,  # <|im_end|>
        "num_embeddings": vocab_size,
        "tokenizer_len": len(tok),
        "config": config,
        "state_dict": state_dict,
    }


# --------------------------------------------------------------------------------------------
# Independent LLaDA forward pass (no transformers), from modeling_llada.py's formulas
# --------------------------------------------------------------------------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # RMSLayerNorm: x * rsqrt(mean(x^2) + eps) in float32, then * weight (no bias in LLaDA).
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    # RotaryEmbedding.rotate_half: view (..., 2, hs/2), unbind -> cat(-x2, x1).  The two halves
    # are contiguous (NOT interleaved pairs), i.e. the same convention as HF Llama.
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


@torch.no_grad()
def llada_reference_logits(
    state_dict: dict[str, torch.Tensor], config: dict[str, Any], input_ids: torch.Tensor
) -> torch.Tensor:
    """LLaDA logits for ``input_ids`` (B, L), bidirectional attention, no padding.

    A naive re-implementation of LLaDAModel.forward for block_type "llama" (modeling_llada.py):

    * x = wte[ids] (* sqrt(d_model) if input_emb_norm);
    * per block: h = attn_norm(x); q, k, v = q_proj(h), k_proj(h), v_proj(h); split into heads
      of size d_model // n_heads; RoPE on q and k with inv_freq = theta^(-2i/hd), positions
      0..L-1, angles cat(freqs, freqs); k, v heads repeated (repeat_interleave) to n_heads;
      softmax(q k^T / sqrt(hd)) v with NO mask; x += attn_out(att);
      h = ff_norm(x); x += ff_out(act(ff_proj(h)) * up_proj(h));
    * logits = ln_f(x) @ (transformer.ff_out or, with weight_tying, wte)^T
      (/ sqrt(d_model) if scale_logits).

    ``state_dict`` uses the upstream names (``model.transformer....``); float32 recommended.
    """
    if config.get("block_type", "llama") != "llama":
        raise NotImplementedError("only block_type 'llama' (every released LLaDA) is implemented")
    if config.get("alibi") or not config.get("rope", True):
        raise NotImplementedError("LLaDA uses RoPE, not ALiBi / learned positions")
    if config.get("attention_layer_norm"):
        raise NotImplementedError("q/k layer norms are off in every released LLaDA")
    act = _ACTIVATIONS.get(config.get("activation_type", "silu"))
    if act is None:
        raise NotImplementedError(f"activation {config.get('activation_type')!r}")

    sd = state_dict
    d = config["d_model"]
    n_heads = config["n_heads"]
    n_kv = config.get("n_kv_heads") or n_heads
    hd = d // n_heads
    eps = config.get("rms_norm_eps", 1e-5)
    theta = config.get("rope_theta", 10000.0)
    pre = "model.transformer."

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    b, length = input_ids.shape
    x = F.embedding(input_ids, sd[pre + "wte.weight"])
    if config.get("input_emb_norm"):
        x = x * d**0.5

    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)  # (L, hd)
    sin, cos = angles.sin().to(x.dtype), angles.cos().to(x.dtype)

    def rope(t: torch.Tensor) -> torch.Tensor:  # t: (B, heads, L, hd)
        return t * cos + _rotate_half(t) * sin

    for i in range(config["n_layers"]):
        p = f"{pre}blocks.{i}."
        h = _rms_norm(x, sd[p + "attn_norm.weight"], eps)
        q = lin(h, p + "q_proj").view(b, length, n_heads, hd).transpose(1, 2)
        k = lin(h, p + "k_proj").view(b, length, n_kv, hd).transpose(1, 2)
        v = lin(h, p + "v_proj").view(b, length, n_kv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = scores.softmax(dim=-1) @ v
        att = att.transpose(1, 2).reshape(b, length, d)
        x = x + lin(att, p + "attn_out")

        h = _rms_norm(x, sd[p + "ff_norm.weight"], eps)
        x = x + lin(act(lin(h, p + "ff_proj")) * lin(h, p + "up_proj"), p + "ff_out")

    x = _rms_norm(x, sd[pre + "ln_f.weight"], eps)
    if config.get("weight_tying"):
        logits = F.linear(x, sd[pre + "wte.weight"])
    else:
        logits = lin(x, pre + "ff_out")
    if config.get("scale_logits"):
        logits = logits / math.sqrt(d)
    return logits
