"""Model families and the per-model diffusion settings stored in a checkpoint.

A family is a small adapter, not a copy of the pipeline (DESIGN.md):

| family  | attention                                  | logits                      | exact KV cache |
|---------|--------------------------------------------|-----------------------------|----------------|
| block   | block-causal by absolute position          | position j predicts token j | yes            |
| full    | bidirectional over prompt + canvas         | position j predicts token j | no             |
| shifted | block-causal (default) or full, AR-initialised | position j-1 predicts token j | with block attention |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tracerl.errors import CheckpointError

FAMILIES = ("block", "full", "shifted")
ATTENTIONS = ("block", "full")
SPEC_FORMAT_VERSION = 1


@dataclass(frozen=True)
class DiffusionSpec:
    """Everything beyond the HF backbone that a checkpoint needs to reload without flags.

    Stored as the ``tracerl`` section of ``config.json``.
    """

    family: str
    mask_token_id: int
    block_size: int = 4
    # "block": block-causal across blocks, bidirectional inside; "full": bidirectional everywhere.
    attention: str = "block"
    # Where the weights came from ("tracerl", "sdar", "llada", "dream", "llama", "qwen2", "qwen3"):
    # informational, kept so a converted checkpoint remembers its origin.
    source_layout: str = "tracerl"
    format_version: int = SPEC_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise CheckpointError(f"unknown family {self.family!r}; valid: {', '.join(FAMILIES)}")
        if self.attention not in ATTENTIONS:
            raise CheckpointError(
                f"unknown attention {self.attention!r}; valid: {', '.join(ATTENTIONS)}"
            )
        if self.family == "block" and self.attention != "block":
            raise CheckpointError("the block family needs attention='block'")
        if self.family == "full" and self.attention != "full":
            raise CheckpointError("the full family needs attention='full'")
        for name in ("block_size", "mask_token_id", "format_version"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise CheckpointError(f"{name} must be an integer, got {value!r}")
        if self.block_size < 1:
            raise CheckpointError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if not isinstance(self.extra, dict):
            raise CheckpointError(f"extra must be an object, got {self.extra!r}")

    @property
    def logit_shift(self) -> int:
        """1 when the logit at position j-1 predicts token j (AR-initialised models)."""
        return 1 if self.family == "shifted" else 0

    @property
    def exact_cache(self) -> bool:
        """Whether committing finished blocks to a KV cache is exact (block-causal attention)."""
        return self.attention == "block"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> DiffusionSpec:
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: the 'tracerl' section must be an object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(
                f"{where}: unknown key(s) {unknown} in the 'tracerl' section; valid: {sorted(known)}"
            )
        for required in ("family", "mask_token_id"):
            if required not in data:
                raise CheckpointError(f"{where}: the 'tracerl' section lacks {required!r}")
        version = data.get("format_version", SPEC_FORMAT_VERSION)
        if isinstance(version, int) and version > SPEC_FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: checkpoint format_version {version} is newer than this tracerl "
                f"({SPEC_FORMAT_VERSION}); upgrade tracerl"
            )
        try:
            return cls(**data)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
        except TypeError as e:
            raise CheckpointError(f"{where}: bad 'tracerl' section: {e}") from None
