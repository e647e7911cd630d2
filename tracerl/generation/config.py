"""Sampling settings, validated up front with errors that name the option."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from tracerl.errors import ConfigError
from tracerl.generation.seeds import check_seed_value

STRATEGIES = ("static", "dynamic", "sequential", "entropy_bounded", "random", "margin")
# Approximate caches for full attention (Fast-dLLM, arXiv 2505.22618): "prefix" recomputes the
# prefix KV once per block, "dual" also caches the suffix.  "none" is exact.  Block-attention
# models always use their exact block cache unless use_cache is False.
FULL_CACHE_MODES = ("none", "prefix", "dual")


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128  # response tokens at most (whole blocks are denoised)
    block_size: int | None = None  # None: the model's own block size
    steps: int | None = None  # denoising forwards per block at most; None: one token per step
    strategy: str = "static"  # unmasking rule: static, dynamic, sequential, entropy_bounded, random, margin
    threshold: float = 0.9  # dynamic: commit every masked token whose confidence exceeds this
    eb_threshold: float = 0.35  # entropy_bounded: entropy budget per step (EB-sampler's gamma)
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's eos (+ <|im_end|>)
    # Stop strings, checked when a block is final on the decoded response (tracerl.generation.stops);
    # the response ends with the token that completes the first one.
    stop: tuple[str, ...] = ()
    use_cache: bool = True  # exact block KV cache (block attention); off = the uncached reference
    full_cache: str = "none"  # full-attention models: none | prefix | dual
    # Request i of a generate() call without explicit `seeds=` uses derive_seed(seed, i); pass
    # `seeds=` for identities that do not depend on the call.  Greedy decoding ignores it.
    seed: int | None = None  # base seed of the per-request random streams (None: fresh random seeds)
    return_logprobs: bool = False  # also return each token's sampled log-prob and confidence

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(option: str, why: str) -> ConfigError:
            return ConfigError(f"{option}: {why}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", f"must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 1):
            raise bad("block_size", f"must be an integer >= 1, got {self.block_size!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise bad("steps", f"must be an integer >= 1, got {self.steps!r}")
        if self.strategy not in STRATEGIES:
            raise bad("strategy", f"unknown {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if not 0.0 < self.threshold <= 1.0:
            raise bad("threshold", f"must be in (0, 1], got {self.threshold!r}")
        if self.eb_threshold <= 0:
            raise bad("eb_threshold", f"must be > 0, got {self.eb_threshold!r}")
        if self.temperature < 0:
            raise bad("temperature", f"must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.full_cache not in FULL_CACHE_MODES:
            raise bad("full_cache", f"unknown {self.full_cache!r}; valid: {', '.join(FULL_CACHE_MODES)}")
        if self.seed is not None:
            self.seed = check_seed_value(self.seed, "seed")
        if self.stop_token_ids is not None:
            self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (list, tuple)):
            raise bad("stop", f"must be a list of non-empty strings, got {self.stop!r}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise bad("stop", f"item {i} must be a non-empty string, got {s!r}")
        self.stop = tuple(self.stop)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
