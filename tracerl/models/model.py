"""DiffusionLM: a Hugging Face causal-LM backbone driven as a diffusion language model.

The backbone is a stock transformers model (Llama, Qwen2, Qwen3).  Diffusion behaviour comes only
from what we feed it: explicit 4D boolean attention masks (masks.py) and explicit position ids.
Nothing in the backbone is patched, so its weights stay readable by ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tracerl import masks
from tracerl.errors import CheckpointError
from tracerl.models.attention import use_tracerl_attention
from tracerl.models.family import DiffusionSpec

BACKBONE_TYPES = ("llama", "qwen2", "qwen3")


class DiffusionLM(nn.Module):
    """A backbone + tokenizer + the diffusion settings (family, mask token, block size)."""

    def __init__(
        self, backbone: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: DiffusionSpec
    ) -> None:
        super().__init__()
        if backbone.config.model_type not in BACKBONE_TYPES:
            raise ValueError(
                f"unsupported backbone {backbone.config.model_type!r}; valid: {BACKBONE_TYPES}"
            )
        use_tracerl_attention(backbone)  # SDPA without the grouped-query copy on CPU (attention.py)
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.spec = spec

    # -- convenience accessors -------------------------------------------------------------
    @property
    def config(self):
        return self.backbone.config

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def mask_token_id(self) -> int:
        return self.spec.mask_token_id

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer (may exceed ``len(tokenizer)``: padded vocabularies)."""
        return self.backbone.get_output_embeddings().weight.shape[0]

    @property
    def unsampleable_ids(self) -> list[int]:
        """Ids the sampler never emits: the mask token and padded vocabulary rows past the
        tokenizer.  The RL policy's log-probs renormalise without them (rows.target_logprobs)."""
        return sorted({self.mask_token_id, *range(len(self.tokenizer), self.vocab_size)})

    @property
    def max_positions(self) -> int:
        return int(self.config.max_position_embeddings)

    # -- forward ---------------------------------------------------------------------------
    # The attention training rows use (TrainingRun sets it from loop.attention): sdpa | flex.
    train_attention = "sdpa"

    def attention_mask(
        self, positions: torch.Tensor, valid: torch.Tensor, attention: str | None = None
    ) -> torch.Tensor:
        """Self-attention mask of this model's attention kind (or ``attention`` if given)."""
        return masks.mask_for_attention(
            attention or self.spec.attention, positions, valid, self.spec.block_size
        )

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache=None,
        use_cache: bool = False,
    ):
        """Last hidden states ``(B, L, H)`` and the (possibly extended) KV cache.

        ``cache`` is a transformers ``Cache`` (e.g. ``DynamicCache``) holding the keys/values of
        earlier positions; the mask's key axis then covers cache + new tokens.
        """
        out = self.backbone.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.cache

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits for any selection of hidden states (compute only what you need)."""
        return self.backbone.lm_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache=None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        """Raw logits ``(B, L, V)``: position j predicts token j (block/full) or j+1 (shifted)."""
        hidden, _ = self.hidden_states(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )
        return self.lm_logits(hidden)

    # -- saving ----------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write an HF folder (safetensors + config with a ``tracerl`` section + tokenizer).

        The folder is written next to its destination and renamed into place, so a reader never
        sees a half-written checkpoint; an existing folder at ``folder`` is replaced.
        """
        with atomic_folder(folder) as tmp:
            self.write_files(tmp)
        return Path(folder)

    def write_files(self, folder: Path, state_dict: dict | None = None) -> None:
        """Write the model files into an existing folder (no atomicity: see save_pretrained).

        ``state_dict``: the backbone's weights to write (keys as in ``backbone.state_dict()``)
        instead of the live ones, e.g. gathered from the shards of several ranks."""
        backbone = self.backbone
        if hasattr(backbone, "peft_config"):  # LoRA: write the merged weights, keep the adapter live
            raise RuntimeError("merge or export the LoRA adapter before saving (tracerl.train.lora)")
        backbone.config.tracerl = self.spec.to_dict()
        if state_dict is None:
            backbone.save_pretrained(folder, safe_serialization=True)
        else:
            from safetensors.torch import save_file

            backbone.config.save_pretrained(folder)
            if backbone.generation_config is not None and backbone.can_generate():
                backbone.generation_config.save_pretrained(folder)
            if self.config.tie_word_embeddings:  # one tensor on disk, as save_pretrained writes it
                state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(Path(folder) / "model.safetensors"),
                      metadata={"format": "pt"})
        self.tokenizer.save_pretrained(folder)
        _check_saved_config(Path(folder) / "config.json")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.backbone.parameters())

    def nonfinite_parameters(self) -> list[str]:
        """Names of the backbone tensors holding a NaN or an infinity (a diverged or damaged
        checkpoint: it loads, but every logit it produces is NaN)."""
        return [name for name, p in self.backbone.named_parameters() if not torch.isfinite(p).all()]


def check_finite(model: DiffusionLM, where: str) -> DiffusionLM:
    """``model``, if every weight is finite; else a ``CheckpointError`` naming the tensors."""
    bad = model.nonfinite_parameters()
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(f"{where}: non-finite weights (NaN or inf) in {shown}; the model cannot generate "
                              "(restore an earlier checkpoint)")
    return model


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike):
    """Yield a temporary sibling folder; on success rename it to ``folder`` (replacing it)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _check_saved_config(path: Path) -> None:
    # The spec must survive the config round trip, or the checkpoint would not reload alone.
    data = json.loads(path.read_text())
    if "tracerl" not in data:
        raise RuntimeError(f"{path}: transformers dropped the 'tracerl' section while saving")
