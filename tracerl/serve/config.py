"""``ServeConfig``: what ``tracerl serve`` runs (model, address, engine size, limits, defaults)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from tracerl.errors import ConfigError
from tracerl.generation.config import SamplingConfig
from tracerl.llm import SamplingParams


@dataclass
class ServeConfig:
    model: str = "tiny-block"  # preset or checkpoint folder
    host: str = "127.0.0.1"  # loopback by default; 0.0.0.0 exposes the server to the network
    port: int = 8000  # 0: any free port (the startup line says which)
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer KEY" (401 otherwise)
    served_model_name: str | None = None  # the name clients send as "model"; unset: the --model value
    device: str = "cpu"  # cpu, cuda, cuda:N
    dtype: str | None = None  # float32, bfloat16, float16; unset: the loader's
    max_running: int = 64  # samples decoded together (the engine's batch)
    num_pages: int | None = None  # KV pages (block attention); unset: max_running full contexts within 2 GiB (CPU) / half the free GPU memory
    kv_cache_bytes: int | None = None  # or the pool's size in bytes
    max_waiting: int = 256  # samples queued beyond the batch; more: 503 with Retry-After
    max_tokens_cap: int | None = None  # largest max_tokens accepted; unset: the model's context
    max_n: int = 16  # largest n accepted
    max_body_bytes: int = 1 << 20  # larger request bodies: 413
    request_timeout_s: float = 600.0  # a request still running after this is stopped (504)
    shutdown_timeout_s: float = 60.0  # SIGTERM: how long running requests may take to finish
    defaults: SamplingParams = field(default_factory=SamplingParams)  # for fields a request leaves out

    def validate(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if self.host != "localhost":
                raise ConfigError(f"host: {self.host!r} is not an IP address (or localhost)") from None
        for name, low in (("port", 0), ("max_running", 1), ("max_waiting", 0), ("max_n", 1),
                          ("max_body_bytes", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low or (name == "port" and v > 65535):
                raise ConfigError(f"{name}: must be an integer >= {low}{' and <= 65535' if name == 'port' else ''}, "
                                  f"got {v!r}")
        if self.max_tokens_cap is not None and (not isinstance(self.max_tokens_cap, int) or self.max_tokens_cap < 1):
            raise ConfigError(f"max_tokens_cap: must be an integer >= 1, got {self.max_tokens_cap!r}")
        for name in ("request_timeout_s", "shutdown_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{name}: must be a number > 0, got {v!r}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("api_key: empty; leave it unset for no key")
        self.defaults.validate()

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


def defaults_from_sampling(config: SamplingConfig) -> SamplingParams:
    """The server's default ``SamplingParams`` from ``tracerl serve``'s sampling options (those of
    ``tracerl generate``).  ``--stop-token-ids`` lists exactly the stop tokens, as in generate."""
    return SamplingParams(
        max_tokens=config.max_new_tokens, block_size=config.block_size, steps=config.steps, strategy=config.strategy,
        threshold=config.threshold, eb_threshold=config.eb_threshold, temperature=config.temperature,
        top_k=config.top_k, top_p=config.top_p, stop=list(config.stop) or None,
        stop_token_ids=None if config.stop_token_ids is None else list(config.stop_token_ids),
        ignore_eos=config.stop_token_ids is not None, seed=config.seed,
        full_cache=config.full_cache if config.use_cache else "none",
    )
