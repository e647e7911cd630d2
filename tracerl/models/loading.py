"""Load a diffusion LM from a preset name or a local folder, with no flags needed.

The folder's ``config.json`` decides: a ``tracerl`` section means one of our checkpoints;
otherwise ``model_type`` picks a layout (layouts.py).  Weights are checked against the model the
config describes *before* anything is loaded: a missing, unexpected or mis-shaped tensor is an
error naming the file, never a silent random initialisation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers import Qwen3Config, Qwen3ForCausalLM

from tracerl.devices import check_device
from tracerl.errors import CheckpointError
from tracerl.files import read_utf8
from tracerl.models.family import DiffusionSpec
from tracerl.models.layouts import Layout, layout_for_model_type
from tracerl.models.model import DiffusionLM
from tracerl.models.hub import looks_like_hub_id, snapshot
from tracerl.models.presets import build_preset, is_preset
from tracerl.models.tokenizer import ADDED_MASK_TOKEN, check_mask_token_id, resolve_mask_token_id

BACKBONES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None -> float32 on CPU (bf16 matmuls are slow and lossy there), bfloat16 on accelerators."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    family: str | None = None,
    attention: str | None = None,
    block_size: int | None = None,
    seed: int = 0,
) -> DiffusionLM:
    """Load a preset (``tiny-block``, ``tiny-full``, ``tiny-shifted``), a local HF folder or a Hub
    id ``org/name[@revision]`` (from the HF cache, downloaded unless ``HF_HUB_OFFLINE=1``; hub.py).

    ``family`` / ``attention`` / ``block_size`` override what the checkpoint says (e.g. to treat
    a plain causal LM as a block-diffusion model, or to adapt a block-4 model to block 8).
    """
    device = check_device(device)  # before reading any weights
    dtype = resolve_dtype(dtype, device)
    name = str(name_or_path)
    if is_preset(name) and not Path(name).exists():
        model = build_preset(name, seed=seed, dtype=dtype)
    elif looks_like_hub_id(name):
        model = _load_folder(snapshot(name, error=CheckpointError), dtype)
    else:
        model = _load_folder(Path(name), dtype)
    overrides = {k: v for k, v in dict(family=family, attention=attention, block_size=block_size).items()
                 if v is not None}
    if overrides:
        if "family" in overrides and "attention" not in overrides:
            overrides["attention"] = "full" if overrides["family"] == "full" else "block"
        model.spec = DiffusionSpec(**{**model.spec.to_dict(), **overrides})
    return model.to(device).eval()


def _read_config(folder: Path) -> dict:
    if not folder.exists():
        raise CheckpointError(
            f"{folder}: no such folder (and not a preset or a Hub id org/name; presets: tiny-block, tiny-full, "
            f"tiny-shifted)"
        )
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a model folder needs a config.json")
    try:
        data = json.loads(read_utf8(path, CheckpointError))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _load_folder(folder: Path, dtype: torch.dtype) -> DiffusionLM:
    data = _read_config(folder)
    where = str(folder / "config.json")
    if "tracerl" in data:
        spec = DiffusionSpec.from_dict(data["tracerl"], where)
        layout = layout_for_model_type(data.get("model_type"), where)
        if layout.backbone_type != layout.name:
            raise CheckpointError(
                f"{where}: a tracerl checkpoint must have a llama/qwen2/qwen3 model_type, "
                f"got {data.get('model_type')!r}"
            )
    else:
        spec = None
        layout = layout_for_model_type(data.get("model_type"), where)

    config_cls, model_cls = BACKBONES[layout.backbone_type]
    try:
        config = config_cls(**layout.translate_config(data, where))
    except CheckpointError:
        raise
    except Exception as e:  # transformers validates fields strictly (types, layer_types length)
        raise CheckpointError(f"{where}: invalid {layout.name} config: {type(e).__name__}: {e}") from None
    _check_token_ids(config, where)
    tokenizer = _load_tokenizer(folder)
    backbone = _load_weights(folder, model_cls, config, layout, dtype)

    if spec is None:
        spec = _spec_for_layout(layout, data, tokenizer, backbone, folder)
    else:
        check_mask_token_id(tokenizer, spec.mask_token_id, backbone.get_input_embeddings().weight.shape[0], where)
    return DiffusionLM(backbone, tokenizer, spec)


def _check_token_ids(config, where: str) -> None:
    """Every special token id of the config must have an embedding row (an id past
    ``vocab_size`` fails deep in torch, e.g. as an ``AssertionError`` on the padding row).  The
    mask id is checked against the loaded table by ``check_mask_token_id``."""
    vocab = config.vocab_size
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise CheckpointError(f"{where}: vocab_size must be a positive integer, got {vocab!r}")
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(config, key, None)
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            # (negative ids pass: Llama-1 configs say pad_token_id -1, which torch reads as the last row)
            if isinstance(token_id, int) and token_id >= vocab:
                raise CheckpointError(f"{where}: {key}={token_id} is not below vocab_size={vocab} "
                                      f"(token ids are 0..{vocab - 1}); fix vocab_size or {key}")


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((folder / n).is_file() for n in names):
        raise CheckpointError(f"{folder}: no tokenizer files (expected one of {', '.join(names)})")
    try:
        if (folder / "tokenizer.json").is_file():
            # tokenizer.json is the whole truth; AutoTokenizer would pick a class from model_type
            # (e.g. Qwen2Tokenizer for qwen2) that rebuilds the pipeline with its own normaliser.
            tok = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types here; keep the cause visible
        tok = _fallback_tokenizer(folder)
        if tok is None:
            raise CheckpointError(f"{folder}: cannot load the tokenizer: {type(e).__name__}: {e}") from e
    if tok.padding_side != "left":
        tok.padding_side = "left"  # prompts are left-padded so generation starts in the same column
    return tok


def _fallback_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    """Checkpoints whose tokenizer class is remote code (Dream's DreamTokenizer is a Qwen2 BPE
    over vocab.json + merges.txt): read the files with the stock class instead."""
    from transformers import Qwen2Tokenizer

    try:
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception:
        return None
    return None


def _spec_for_layout(
    layout: Layout, data: dict, tokenizer: PreTrainedTokenizerBase, backbone, folder: Path
) -> DiffusionSpec:
    where = str(folder)
    mask_id = resolve_mask_token_id(
        tokenizer,
        candidates=layout.mask_token_names,
        config_mask_id=data.get("mask_token_id"),
        where=where,
    )
    if mask_id is None and layout.default_mask_id is not None:
        mask_id = layout.default_mask_id
    if mask_id is None:
        if not layout.may_add_mask_token:
            raise CheckpointError(
                f"{where}: the tokenizer has no mask token (looked for "
                f"{', '.join(layout.mask_token_names)}) and config.json has no mask_token_id"
            )
        # AR -> diffusion adaptation: a new special token with a fresh embedding row.
        tokenizer.add_special_tokens({"mask_token": ADDED_MASK_TOKEN})
        mask_id = tokenizer.mask_token_id
        rows = backbone.get_input_embeddings().weight.shape[0]
        if mask_id >= rows:
            backbone.resize_token_embeddings(mask_id + 1, mean_resizing=True)
    elif tokenizer.mask_token_id is None:
        token = tokenizer.convert_ids_to_tokens(mask_id)
        if token is not None:
            tokenizer.mask_token = token  # so the tokenizer saved with our checkpoint knows it
    check_mask_token_id(tokenizer, mask_id, backbone.get_input_embeddings().weight.shape[0], where)
    return DiffusionSpec(
        family=layout.family,
        mask_token_id=mask_id,
        # SDAR configs carry the block size they were trained with.
        block_size=int(data.get("block_size") or layout.block_size),
        attention=layout.attention,
        source_layout=layout.name,
    )


# --- weights -------------------------------------------------------------------------------

def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
        files = sorted({folder / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {index.name} but missing")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if (folder / "pytorch_model.bin").is_file() or list(folder.glob("pytorch_model-*.bin")):
        raise CheckpointError(
            f"{folder}: only pickle weights (pytorch_model*.bin) found; tracerl reads safetensors "
            "(convert with transformers' save_pretrained(safe_serialization=True))"
        )
    raise CheckpointError(f"{folder}: no weights (model.safetensors or model.safetensors.index.json)")


def _checkpoint_tensors(folder: Path, layout: Layout) -> dict[str, tuple[Path, str, list[int]]]:
    """Map of backbone name -> (file, name in file, shape), from the safetensors headers only."""
    found: dict[str, tuple[Path, str, list[int]]] = {}
    for path in _weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    target = layout.rename(key)
                    if target in found:
                        raise CheckpointError(
                            f"{path}: tensor {key!r} maps to {target!r}, already given by "
                            f"{found[target][0].name}:{found[target][1]}"
                        )
                    found[target] = (path, key, list(f.get_slice(key).get_shape()))
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    return found


def _load_weights(folder: Path, model_cls, config, layout: Layout, dtype: torch.dtype):
    # Build on the meta device (no random init of billions of weights), keep buffers real.
    with init_empty_weights(include_buffers=False):
        backbone = model_cls(config)
    expected = {k: list(v.shape) for k, v in backbone.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    found = _checkpoint_tensors(folder, layout)
    if tied:
        expected.pop("lm_head.weight", None)
        found.pop("lm_head.weight", None)  # some writers store the tied copy too

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    files = ", ".join(sorted({p.name for p, _, _ in found.values()})) or "no tensors"
    if missing:
        raise CheckpointError(
            f"{folder}: {len(missing)} weight(s) missing from {files} for the {layout.name} layout, "
            f"e.g. {', '.join(layout.checkpoint_name(k) for k in missing[:4])}"
        )
    if unexpected:
        shown = ", ".join(f"{found[k][0].name}:{found[k][1]}" for k in unexpected[:4])
        raise CheckpointError(
            f"{folder}: {len(unexpected)} tensor(s) not used by the {layout.name} layout, e.g. {shown}"
        )
    for name, shape in expected.items():
        path, key, got = found[name]
        if got != shape:
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(got)} but config.json implies {tuple(shape)}"
            )

    state = {}
    by_file: dict[Path, list[str]] = {}
    for name, (path, _, _) in found.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                tensor = f.get_tensor(found[name][1])
                if not tensor.is_floating_point():
                    raise CheckpointError(f"{path}: tensor {found[name][1]!r} is not floating point")
                state[name] = tensor.to(dtype)
    backbone.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        backbone.tie_weights()
    leftover = [n for n, p in backbone.named_parameters() if p.is_meta]
    if leftover:  # would mean a bug in the checks above; never hand out uninitialised weights
        raise CheckpointError(f"{folder}: weights left uninitialised: {', '.join(leftover[:4])}")
    return backbone.to(dtype).eval()
