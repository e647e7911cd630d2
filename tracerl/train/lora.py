"""LoRA through peft: inject adapters, save the adapter, export merged weights, run the base.

``DiffusionLM.backbone`` must stay the plain transformers model (``backbone.model`` is the
decoder whose hidden states the objectives read, ``backbone.lm_head`` the head).  Wrapping it in
a ``PeftModel`` would break that: ``PeftModel.model`` is peft's ``LoraModel``, whose forward is the
whole causal LM (logits, no ``last_hidden_state``).  So ``apply_lora`` lets peft inject the
adapter layers *in place* into the backbone (``get_peft_model`` does that) and keeps the
``PeftModel`` wrapper on the side, for what only it can do: save the adapter, load its state
dict, merge.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tracerl.errors import ConfigError
from tracerl.models.model import DiffusionLM

# backbone -> (the PeftModel wrapping it, our LoraConfig); the backbone stays the model's .backbone.
_WRAPPERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class LoraConfig:
    enabled: bool = False  # train LoRA adapters instead of all weights (peft)
    r: int = 8  # adapter rank
    alpha: int = 16  # adapter scale numerator (scale = alpha / r)
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # modules that get adapters
    merge_on_save: bool = True  # final export: merged HF weights (True) or the adapter alone

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r: must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules: give at least one module name (e.g. q_proj)")


def is_lora(model: DiffusionLM) -> bool:
    return model.backbone in _WRAPPERS


def peft_wrapper(model: DiffusionLM):
    try:
        return _WRAPPERS[model.backbone][0]
    except KeyError:
        raise ValueError("this model has no LoRA adapter (tracerl.train.lora.apply_lora)") from None


def apply_lora(model: DiffusionLM, config: LoraConfig, seed: int = 0) -> None:
    """Inject trainable LoRA adapters into ``model.backbone`` in place; every other weight is frozen.

    The adapters' random initialisation is drawn from ``seed`` (not from whatever state the
    global RNG is in), so a LoRA run is a function of its config."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if is_lora(model):
        raise ValueError("the model already has a LoRA adapter")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.backbone.named_modules()}
    missing = [t for t in config.target_modules if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.backbone.named_modules()
                         if type(m).__name__ == "Linear"})
        raise ConfigError(f"lora.target_modules: no module named {missing[0]!r} in this model; "
                          f"valid: {', '.join(linear)}")
    peft_config = PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                 target_modules=list(config.target_modules), bias="none")
    backbone = model.backbone
    with torch.random.fork_rng(devices=[backbone.device] if backbone.device.type == "cuda" else []):
        torch.manual_seed(seed)
        with warnings.catch_warnings():  # peft calls a transformers API deprecated for v6
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            wrapper = get_peft_model(backbone, peft_config)
    if wrapper.base_model.model is not backbone:  # peft changed how it wraps: fail loudly
        raise RuntimeError("peft did not inject the adapter in place")
    _WRAPPERS[backbone] = (wrapper, config)


def lora_config(model: DiffusionLM) -> LoraConfig:
    peft_wrapper(model)
    return _WRAPPERS[model.backbone][1]


def merged_copy(model: DiffusionLM) -> DiffusionLM:
    """A plain model with the adapter merged in; the training model keeps its live adapter."""
    backbone = copy.deepcopy(peft_wrapper(model)).merge_and_unload()
    if hasattr(backbone, "peft_config"):
        del backbone.peft_config  # merged: a plain transformers model again
    return DiffusionLM(backbone, model.tokenizer, model.spec)


def lora_copy(model: DiffusionLM) -> DiffusionLM:
    """A deep copy that is a LoRA model in its own right (its adapter live, registered here):
    merged_copy, save_adapter and base_copy work on it, e.g. the unsharded inference copy of a
    sharded LoRA policy."""
    peft_wrapper(model)  # a LoRA model, or a clear error
    wrapper, config = _WRAPPERS[model.backbone]
    copied = copy.deepcopy(wrapper)
    backbone = copied.base_model.model
    _WRAPPERS[backbone] = (copied, config)
    return DiffusionLM(backbone, model.tokenizer, model.spec)


def base_copy(model: DiffusionLM) -> DiffusionLM:
    """A plain copy of the model *without* its adapter (the frozen base weights), e.g. the
    backbone of a value model of its own, or a KL reference that later takes merged weights."""
    backbone = copy.deepcopy(peft_wrapper(model)).unload()
    if hasattr(backbone, "peft_config"):
        del backbone.peft_config
    return DiffusionLM(backbone, model.tokenizer, model.spec)


@contextlib.contextmanager
def adapter_disabled(model: DiffusionLM):
    """Run ``model`` as its base weights (the adapter switched off) inside the block: the start
    model of a LoRA run without a second copy in memory (TRL's and d1's KL reference)."""
    with peft_wrapper(model).disable_adapter():
        yield model


def merged_parameters(model: DiffusionLM) -> dict:
    """``{name: tensor}`` of the model as ``merged_copy`` would have it (names without peft's
    ``base_layer``/``lora_*`` parts), without copying the model: an adapted layer's entry is a
    function that computes its merged weight when called, the others are the live tensors.
    One merged weight at a time is what a weight update (a synced KL reference) needs."""
    peft_wrapper(model)
    adapted = {name: module for name, module in model.named_modules() if hasattr(module, "get_delta_weight")}
    out = {}
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        if owner in adapted and leaf:
            layer = adapted[owner]
            out[f"{owner}.{leaf}"] = (lambda layer=layer, param=param: param + sum(
                layer.get_delta_weight(a) for a in layer.active_adapters)) if leaf == "weight" else param
        else:
            out[name] = param
    return out


def save_adapter(model: DiffusionLM, folder: Path) -> None:
    peft_wrapper(model).save_pretrained(str(folder))


def load_adapter_weights(model: DiffusionLM, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(peft_wrapper(model), load_file(str(folder / "adapter_model.safetensors")))
    unexpected = getattr(result, "unexpected_keys", None) or []
    missing = [k for k in (getattr(result, "missing_keys", None) or []) if "lora_" in k]
    if unexpected or missing:
        raise ConfigError(f"{folder}: the adapter does not match this LoRA configuration "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
