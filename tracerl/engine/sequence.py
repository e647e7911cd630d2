"""One request's decoding state, kept so that its output cannot depend on its batch.

Everything that decides a request's tokens lives here and is per request: its config, its own
random stream (seeded like ``generate``'s row stream and drawn from only on the request's own
forwards), its block counter and step counters.  Tokens sit at their absolute positions (index p
= position p, no left padding), which is exactly what the paged cache assumes.  ``reset`` brings
the request back to its submitted state, so a preempted request recomputed from scratch repeats
its first run exactly.
"""

from __future__ import annotations

import enum
import secrets

import torch

from tracerl.errors import ConfigError
from tracerl.generation.config import SamplingConfig
from tracerl.generation.sampler import Generation, check_prompts, default_stop_ids, encode_prompts
from tracerl.generation.seeds import check_seed_value, derive_seed
from tracerl.generation.stops import stop_string_end
from tracerl.generation.unmasking import quota_schedule


class Status(enum.Enum):
    WAITING = "waiting"  # submitted or preempted; holds no pages
    PREFILLING = "prefilling"  # admitted; its first forward (prompt blocks + first block) is next
    DENOISING = "denoising"  # decoding block ``block``
    FINISHED = "finished"


def randomized(config: SamplingConfig) -> bool:
    """Whether the config draws from the random stream (the rule of ``generate``)."""
    return config.temperature > 0 or config.strategy == "random"


class Sequence:
    """A request: prompt, config, seed and its decoding state (see the module docstring)."""

    def __init__(
        self, rid: int, prompt: list[int], config: SamplingConfig, seed: int | None, *,
        block_size: int, mask_id: int, pad_id: int, max_positions: int, stop_ids: tuple[int, ...],
        device: torch.device, stop_strings: tuple[str, ...] = (), decode=None,
    ) -> None:
        """``stop_strings`` (with ``decode``: token ids -> text, the tokenizer's decode with
        ``skip_special_tokens=False``) end the response as in ``generate``: checked when a block
        is final, on the text generated so far before the block's first stop token."""
        self.rid = rid
        self.prompt = [int(t) for t in prompt]
        self.config = config
        self.seed = seed
        self.block_size = b = block_size
        self.mask_id, self.pad_id = mask_id, pad_id
        self.device = device
        self.steps = config.steps or b
        # Requests with equal keys share one draw/select call (runner.unmask).
        self.decoding_key = (b, config.temperature, config.top_k, config.top_p, config.strategy, config.threshold,
                             config.eb_threshold, self.steps, randomized(config))
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.stop_strings = tuple(stop_strings)
        if self.stop_strings and decode is None:
            raise ValueError("Sequence: stop_strings need decode")
        self.decode = decode
        n = len(self.prompt)
        self.end = n + min(config.max_new_tokens, max_positions - n)  # one past the last position
        self.num_blocks = -(-self.end // b)  # also the most KV pages it holds at once
        self.first_block = n // b  # holds the first generated position
        self.reset()

    def reset(self) -> None:
        """Back to the submitted state (fresh random stream, nothing decoded, no slot)."""
        if getattr(self, "pool", None) is not None:
            self.pool.release(self, keep=False)
        self.slot, self.pool = None, None  # a state.StatePool row while running
        n, b, dev = len(self.prompt), self.block_size, self.device
        cols = self.num_blocks * b
        self.tokens = torch.full((cols,), self.pad_id, dtype=torch.long, device=dev)
        self.tokens[:n] = torch.tensor(self.prompt, dtype=torch.long, device=dev)
        self.tokens[n:self.end] = self.mask_id
        self.masked = torch.zeros(cols, dtype=torch.bool, device=dev)
        self.masked[n:self.end] = True
        self.step_map = torch.zeros(cols, dtype=torch.long, device=dev)
        self.logprob = torch.zeros(cols, dtype=torch.float32, device=dev)
        self.confidence = torch.zeros(cols, dtype=torch.float32, device=dev)
        self.nfe = 0
        self.block = self.first_block
        self.step = 0  # forwards spent on the current block
        self._start_block()
        self.carry: torch.Tensor | None = None  # shifted family: logits of the block's column s-1
        self.finished_at = -1  # position of the stop token
        self.finish_reason: str | None = None
        self.status = Status.WAITING
        self.generator = None
        if randomized(self.config):
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(self.seed)

    # -- the current block ---------------------------------------------------------------------
    @property
    def block_start(self) -> int:
        return self.block * self.block_size

    def _start_block(self) -> None:
        """The current block's masked positions before its first step (``at_start``: its
        generated positions; prompt tokens and positions past the length limit are never masked;
        no tensor read) and their quota per step."""
        s = self.block_start
        self.at_start = max(0, min(s + self.block_size, self.end) - max(s, len(self.prompt)))
        self._quotas = quota_schedule(self.at_start, self.steps)

    @property
    def quota(self) -> int:
        """Tokens to commit at this step of the block (``step_quota``)."""
        return self._quotas[self.step] if self.step < len(self._quotas) else self.at_start

    def block_final(self, block_tokens: list[int]) -> None:
        """The current block has no masked position left (``state.record`` found it and passes
        its ``block_size`` tokens): check for a stop string or token, then finish or move to the
        next block."""
        s, e = self.block_start, self.block_start + self.block_size
        lo, hi = max(s, len(self.prompt)), min(e, self.end)  # generated positions of the block
        stop = None
        if not self.stop_ids.isdisjoint(block_tokens):  # most blocks hold no stop token at all
            stop = next((lo + i for i, t in enumerate(block_tokens[lo - s:hi - s]) if t in self.stop_ids), None)
        string_end = self._stop_string_end(lo, hi if stop is None else stop)
        if string_end is not None:
            self.finished_at = string_end
            self.finish("stop")
        elif stop is not None:
            self.finished_at = stop
            self.finish("stop")
        elif e >= self.end:
            self.finish("length")
        else:
            self.block += 1
            self.step = 0
            self._start_block()

    def _stop_string_end(self, lo: int, cut: int) -> int | None:
        """Position of the token completing a stop string in the response before ``cut`` (the
        block's first stop token or its end), if one is completed at or after ``lo``."""
        if not self.stop_strings:
            return None
        n = len(self.prompt)
        found = stop_string_end(self.tokens[n:cut].tolist(), self.decode, self.stop_strings, start=lo - n)
        return None if found is None else n + found[0] - 1

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.status = Status.FINISHED
        self.generator = None
        if self.pool is not None:  # keep the output, free the slot
            self.pool.release(self)

    # -- output ----------------------------------------------------------------------------
    def to_generation(self, model) -> Generation:
        """The ``Generation`` that ``generate`` returns for this prompt, config and seed."""
        if self.status is not Status.FINISHED:
            raise ValueError(f"request {self.rid}: not finished ({self.status.value})")
        n, b = len(self.prompt), self.block_size
        tokens, steps = self.tokens.tolist(), self.step_map.tolist()
        stop = self.finished_at
        end = stop + 1 if stop >= 0 else self.end
        response = tokens[n:end]
        tail_ids, tail_steps = [], []
        if stop >= 0:  # block attention: later blocks were never visible, so no masked tail
            block_end = min((stop // b + 1) * b, self.end)
            tail_ids, tail_steps = tokens[end:block_end], steps[end:block_end]
        with_lp = self.config.return_logprobs
        return Generation(
            prompt_ids=list(self.prompt),
            response_ids=response,
            text=model.tokenizer.decode(response, skip_special_tokens=True),
            raw_text=model.tokenizer.decode(response, skip_special_tokens=False),
            step_map=steps[n:end],
            nfe=self.nfe,
            finish_reason="stop" if stop >= 0 else "length",
            block_size=b,
            family=model.family,
            logprobs=self.logprob.tolist()[n:end] if with_lp else None,
            confidences=self.confidence.tolist()[n:end] if with_lp else None,
            tail_ids=tail_ids,
            tail_steps=tail_steps,
        )


def make_requests(model, prompts: list[list[int]], configs: SamplingConfig | list[SamplingConfig] | None,
                  seeds: list[int] | None, *, cls: type[Sequence] | None = None) -> list[Sequence]:
    """One request (a ``cls``, default ``Sequence``) per prompt, checked before any work.

    ``configs``: one for all prompts or one per prompt (None: defaults).  Seeds follow
    ``generate``'s rule: ``seeds[i]``, else ``derive_seed(configs[i].seed, i)`` when the config
    draws random numbers and has a seed, else a fresh random seed.  A request's block size is
    ``config.block_size or model.block_size``, as in ``generate``."""
    prompts = encode_prompts(prompts, model)
    check_prompts(prompts, model)
    n = len(prompts)
    if configs is None or isinstance(configs, SamplingConfig):
        configs = [configs or SamplingConfig()] * n
    configs = list(configs)
    if len(configs) != n:
        raise ConfigError(f"configs: {len(configs)} configs for {n} prompts; pass one or one per prompt")
    if seeds is not None:
        if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__") or len(seeds) != n:
            raise ConfigError(f"seeds: must be a list of {n} integers (one per prompt), got {seeds!r}")
        seeds = [check_seed_value(v, f"seeds[{i}]") for i, v in enumerate(seeds)]
    cls = cls or Sequence
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731 (as generate's)
    defaults = default_stop_ids(model)  # reads the vocabulary: once per call
    out = []
    for i, (prompt, config) in enumerate(zip(prompts, configs)):
        config.validate()
        seed = seeds[i] if seeds is not None else None
        if seed is None and randomized(config):
            seed = derive_seed(config.seed, i) if config.seed is not None else secrets.randbits(63)
        stops = config.stop_token_ids if config.stop_token_ids is not None else defaults
        out.append(cls(
            i, prompt, config, seed, block_size=config.block_size or model.block_size,
            mask_id=model.mask_token_id, pad_id=pad_id, max_positions=model.max_positions,
            stop_ids=tuple(stops), device=model.device, stop_strings=config.stop, decode=decode,
        ))
    return out
