"""LoRA through peft: wrap the backbone, save the adapter, or export merged weights."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from tracerl.errors import ConfigError
from tracerl.models.model import DiffusionLM


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merge_on_save: bool = True  # final export: merged HF weights (True) or the adapter alone

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r: must be >= 1, got {self.r}")


def is_lora(model: DiffusionLM) -> bool:
    return hasattr(model.backbone, "peft_config")


def apply_lora(model: DiffusionLM, config: LoraConfig) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                 target_modules=list(config.target_modules), bias="none")
    model.backbone = get_peft_model(model.backbone, peft_config)


def merged_copy(model: DiffusionLM) -> DiffusionLM:
    """A plain model with the adapter merged in; the training model keeps its live adapter."""
    backbone = copy.deepcopy(model.backbone).merge_and_unload()
    return DiffusionLM(backbone, model.tokenizer, model.spec)


def save_adapter(model: DiffusionLM, folder: Path) -> None:
    model.backbone.save_pretrained(str(folder))


def load_adapter_weights(model: DiffusionLM, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model.backbone, load_file(str(folder / "adapter_model.safetensors")))
