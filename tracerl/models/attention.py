"""The attention function our backbones run: transformers' SDPA, minus one copy on CPU.

With an explicit mask (every diffusion forward has one) and grouped-query attention (more query
heads than key/value heads), transformers' ``sdpa`` expands the keys and values to one copy per
query head (``repeat_kv``) before calling ``scaled_dot_product_attention``, because CUDA's fused
kernels reject ``enable_gqa`` with a mask.  PyTorch's CPU kernels accept it, so on CPU we call
SDPA with ``enable_gqa=True`` on the unexpanded keys: the same kernel and the same numbers
(bitwise, forward and backward: tests/unit/models/test_attention.py) without the expanded copy,
about 15-20% less sampling time for the tiny presets.  Everything else (CUDA, no mask, equal
head counts) goes to transformers' own ``sdpa`` unchanged.  A FlexAttention ``BlockMask``
(``masks.flex_block_mask``, the GPU training path) goes to ``flex_attention``.  The name lives
only in memory: ``save_pretrained`` does not write it, so checkpoints load anywhere.
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "tracerl_sdpa"


# A forward whose keys live outside the tensors transformers hands the attention function (the
# engine's paged KV cache) registers a reader for its duration: a layer called with the reader's
# own ``mask`` object gets ``reader.attend(module, query, scaling)`` instead, which reads the keys
# where they are.  A context variable, like vLLM's forward context: per thread, per forward.
_KEY_READER: contextvars.ContextVar = contextvars.ContextVar("tracerl_key_reader", default=None)


class reading_keys_from:  # noqa: N801 (used as a context manager, like contextlib's)
    """During the block, attention called with ``reader.mask`` returns ``reader.attend(module,
    query, scaling)`` ``(B, Lq, heads, head_dim)``; every other call runs as usual.  (A class, not
    a generator context manager: entered once per engine forward, it should cost next to nothing.)"""

    def __init__(self, reader) -> None:
        self.reader = reader

    def __enter__(self) -> None:
        self._token = _KEY_READER.set(self.reader)

    def __exit__(self, *exc) -> None:
        _KEY_READER.reset(self._token)


def active_key_reader():
    """The key reader of the forward running in this thread, if any."""
    return _KEY_READER.get()


def routes_attention(backbone) -> bool:
    """Whether ``backbone`` runs ``tracerl_sdpa`` (so a key reader can take over its attention)."""
    return getattr(backbone.config, "_attn_implementation", None) == ATTENTION


def tracerl_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs):
    reader = _KEY_READER.get()
    if reader is not None and attention_mask is reader.mask:
        unsupported = [k for k in ("softcap", "s_aux", "position_bias", "sliding_window") if kwargs.get(k) is not None]
        if unsupported or dropout:
            raise ValueError(f"paged attention: {', '.join(unsupported) or 'dropout'} is not supported here")
        return reader.attend(module, query, scaling), None
    return dense_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                           is_causal=is_causal, **kwargs)


def dense_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs):
    """Attention over dense keys ``(B, kv_heads, K, D)``; returns ``(B, Lq, heads, D)``."""
    if isinstance(attention_mask, BlockMask):  # masks.flex_block_mask: the training path of loop.attention=flex
        if dropout:
            raise ValueError("FlexAttention path: attention dropout is not supported (set it to 0)")
        out = _flex_attention(query.device)(query, key, value, block_mask=attention_mask, scale=scaling,
                                            enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    if (query.device.type == "cpu" and attention_mask is not None and query.shape[1] != key.shape[1]
            and kwargs.get("position_bias") is None):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


_COMPILED_FLEX = None


def _flex_attention(device: torch.device):
    """FlexAttention, compiled on CUDA (the fused kernel that never materialises the scores);
    eager elsewhere (CPU: forward only, a reference implementation, for exactness tests)."""
    global _COMPILED_FLEX
    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
    return _COMPILED_FLEX


AttentionInterface.register(ATTENTION, tracerl_sdpa)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_tracerl_attention(backbone) -> None:
    """Switch a backbone that runs transformers' ``sdpa`` to ``tracerl_sdpa`` (others unchanged)."""
    if getattr(backbone.config, "_attn_implementation", None) == "sdpa":
        backbone.set_attn_implementation(ATTENTION)
