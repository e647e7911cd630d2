"""A vLLM-shaped front end: ``LLM(model).generate(prompts, SamplingParams(...))``.

Each sample equals ``generate(model, [prompt_ids], params.to_sampling_config(model),
seeds=[seed])``: requests run on the continuous-batching ``Engine``, except those it does
not serve (a block-attention request with a block size other than the model's), which run on
``generate`` itself (``_uses_engine``).  Every request is checked before any decoding starts.
"""

from __future__ import annotations

import math
import numbers
import os
import secrets
from dataclasses import dataclass, field

from tracerl.engine import Engine, engine_serves
from tracerl.errors import ConfigError
from tracerl.generation.config import SamplingConfig
from tracerl.generation.sampler import Generation, default_stop_ids, generate
from tracerl.generation.seeds import derive_seed
from tracerl.generation.stops import first_stop
from tracerl.models import DiffusionLM, load_model

# SamplingConfig's option names that SamplingParams spells differently (for error messages).
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "return_logprobs": "logprobs"}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class SamplingParams:
    """Per-request sampling options under vLLM's names, plus the diffusion options.

    Differences from vLLM: ``temperature`` defaults to 0.0 (greedy), not 1.0, because diffusion
    decoding in tracerl defaults to greedy.  ``top_k`` 0 or -1 is off.  ``stop_token_ids``
    None: the model's default stop tokens (eos and ``<|im_end|>``, see ``default_stop_ids``);
    a list: these plus the defaults; ``ignore_eos=True`` drops the defaults (then only the
    listed ids stop).  ``logprobs``: True / 0 / 1 return each sampled token's log-prob (alone:
    no top-k alternatives; larger ints are refused).  ``stop``: strings that end the response
    when a decoded block completes one (the response keeps the token that completes it; ``text``
    is cut before the string unless ``include_stop_str_in_output``).  A stop string must encode
    to at least one token and not contain the mask token (checked per request by ``LLM``).

    Diffusion options (``block_size``, ``steps``, ``strategy``, ``threshold``, ``eb_threshold``,
    ``full_cache``: Fast-dLLM's prefix / dual cache for full-attention models) are those of
    ``SamplingConfig``.  ``n`` samples per prompt; with ``seed`` set, sample j of
    prompt i uses seed ``derive_seed(seed, i, j)``, else a fresh random seed.
    """

    n: int = 1
    max_tokens: int = 128
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: bool | int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    block_size: int | None = None
    steps: int | None = None
    strategy: str = "static"
    threshold: float = 0.9
    eb_threshold: float = 0.35
    full_cache: str = "none"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """One-line ``ConfigError`` naming the first bad field."""
        if not _is_int(self.n) or self.n < 1:
            raise ConfigError(f"n: must be an integer >= 1, got {self.n!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens: must be an integer >= 1, got {self.max_tokens!r}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: must be True or False, got {getattr(self, name)!r}")
        for name in ("temperature", "top_p", "threshold", "eb_threshold"):
            if not _is_real(getattr(self, name)):
                raise ConfigError(f"{name}: must be a finite number, got {getattr(self, name)!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ConfigError(f"top_k: must be an integer >= 0, or -1 / 0 for off, got {self.top_k!r}")
        if self.logprobs is not None and not isinstance(self.logprobs, bool) and (
                not _is_int(self.logprobs) or not 0 <= self.logprobs <= 1):
            raise ConfigError(f"logprobs: must be True, False, None, 0 or 1 (only the sampled token's "
                              f"log-prob is available), got {self.logprobs!r}")
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise ConfigError(f"stop: must be a string or a list of strings, got {self.stop!r}")
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(self.stop_token_ids, "__iter__"):
                raise ConfigError(f"stop_token_ids: must be a list of token ids, got {self.stop_token_ids!r}")
            for k, t in enumerate(self.stop_token_ids):
                if not _is_int(t) or t < 0:
                    raise ConfigError(f"stop_token_ids: item {k} must be a non-negative integer, got {t!r}")
        self._config(())  # SamplingConfig's own checks, under our field names

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None and self.logprobs is not False

    def to_sampling_config(self, model: DiffusionLM) -> SamplingConfig:
        """The ``SamplingConfig`` of one sample (seeds are passed per request, not here)."""
        return self._config(default_stop_ids(model))

    def _config(self, defaults: tuple[int, ...]) -> SamplingConfig:
        if self.stop_token_ids is None:
            stop_ids = () if self.ignore_eos else None
        else:
            listed = tuple(int(t) for t in self.stop_token_ids)
            stop_ids = listed if self.ignore_eos else tuple(sorted(set(defaults) | set(listed)))
        try:
            return SamplingConfig(
                max_new_tokens=self.max_tokens, block_size=self.block_size, steps=self.steps,
                strategy=self.strategy, threshold=self.threshold, eb_threshold=self.eb_threshold,
                full_cache=self.full_cache, temperature=float(self.temperature), top_k=max(0, self.top_k),
                top_p=float(self.top_p),
                stop_token_ids=stop_ids, stop=self.stop_strings, seed=self.seed,
                return_logprobs=self.wants_logprobs,
            )
        except ConfigError as e:
            option, _, why = str(e).partition(":")
            raise ConfigError(f"{_PARAM_NAMES.get(option, option)}:{why}") from None


@dataclass
class CompletionOutput:
    """One sample: vLLM's fields, then the diffusion trace (``trace`` is the full ``Generation``).

    ``token_ids`` run through the stop token or the token completing the stop string.
    ``stop_reason``: the stop string or stop token id that ended it (also for eos, unlike
    vLLM), None on ``finish_reason == "length"``.  ``logprobs``: each token's log-prob under
    its sampling distribution, when asked for."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: str | int | None
    logprobs: list[float] | None
    cumulative_logprob: float | None
    step_map: list[int]
    nfe: int
    trace: Generation = field(repr=False)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """One prompt's samples (``prompt`` is None for a token-id prompt)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


def _uses_engine(model: DiffusionLM, config: SamplingConfig) -> bool:
    """Whether the engine decodes a request; else ``generate`` does (the same outputs)."""
    return engine_serves(model, config) is None


@dataclass
class CheckedRequest:
    """A prompt and its options after ``LLM.check_request``: ready to decode."""
    prompt: str | None
    ids: list[int]
    params: SamplingParams
    config: SamplingConfig | None = None


class LLM:
    """``LLM(model)``: ``model`` is a preset name (``tiny-block``, ...), a local HF folder
    (loaded with ``load_model`` on ``device``, default cpu, in ``dtype``) or a loaded
    ``DiffusionLM``, used as it is (then pass no ``dtype`` / ``device``).  ``max_running``,
    ``num_pages`` and ``kv_cache_bytes`` configure the engine's batch and KV page pool
    (``Engine``'s ``max_running``, ``num_pages``, ``budget_bytes``); full-attention models have
    no page pool."""

    def __init__(self, model: str | os.PathLike | DiffusionLM, *, dtype=None, device=None,
                 max_running: int = 64, num_pages: int | None = None,
                 kv_cache_bytes: int | None = None) -> None:
        if isinstance(model, DiffusionLM):
            if dtype is not None or device is not None:
                raise ConfigError("dtype, device: the model is already loaded; move or cast it before")
            self.model = model
        elif isinstance(model, (str, os.PathLike)):
            self.model = load_model(model, dtype=dtype, device=device or "cpu")
        else:
            raise ConfigError(f"model: must be a preset name, a folder or a DiffusionLM, got {type(model).__name__}")
        self.engine = Engine(self.model, max_running=max_running, num_pages=num_pages,
                             budget_bytes=kv_cache_bytes)
        self._next_id = 0

    def get_tokenizer(self):
        return self.model.tokenizer

    # -- entry points ------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 *, use_chat_template: bool = False) -> list[RequestOutput]:
        """One ``RequestOutput`` per prompt, in order.  ``prompts``: a string, a list of token
        ids, a dict ``{"prompt": str}`` / ``{"prompt_token_ids": [...]}``, or a list of these.
        Strings are encoded without special tokens; with ``use_chat_template`` a string is the
        user turn of the tokenizer's chat template (token-id prompts are used as they are)."""
        return self._run(self.parse_prompts(prompts, use_chat_template), sampling_params)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None
             ) -> list[RequestOutput]:
        """``messages``: one conversation (a list of ``{"role", "content"}`` dicts) or a list of
        them; each is rendered by the tokenizer's chat template with the generation prompt."""
        if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], dict):
            messages = [messages]
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ConfigError(f"messages: must be a conversation or a non-empty list of them, got {messages!r}")
        requests = []
        for i, conv in enumerate(messages):
            if not isinstance(conv, (list, tuple)) or not conv or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in conv):
                raise ConfigError(f"request {i}: messages: must be a non-empty list of "
                                  f"{{'role': str, 'content': str}} dicts")
            requests.append(self.render_chat(list(conv)))
        return self._run(requests, sampling_params)

    def render_chat(self, conversation: list[dict]) -> tuple[str, list[int]]:
        """(text, token ids) of a conversation under the tokenizer's chat template, with the
        generation prompt (the assistant turn's opening) appended."""
        tok = self._chat_tokenizer()
        text = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return text, tok.encode(text, add_special_tokens=False)

    # -- requests ------------------------------------------------------------------------------
    def _chat_tokenizer(self):
        tok = self.model.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ConfigError("chat_template: the model's tokenizer has no chat template")
        return tok

    def parse_prompts(self, prompts, chat: bool = False) -> list[tuple[str | None, list | None]]:
        """(prompt text or None, token ids) per request; ids are checked later."""
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, (list, tuple)) and prompts and all(_is_int(t) for t in prompts)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ConfigError(f"prompts: must be a prompt or a non-empty list of prompts, got {prompts!r}")
        tok = self.model.tokenizer
        out = []
        for i, p in enumerate(prompts):
            text, ids = None, None
            if isinstance(p, dict):
                unknown = sorted(set(p) - {"prompt", "prompt_token_ids"})
                if unknown:
                    raise ConfigError(f"request {i}: {unknown[0]}: unknown prompt key; valid: prompt, prompt_token_ids")
                if ("prompt" in p) == ("prompt_token_ids" in p):
                    raise ConfigError(f"request {i}: prompt: a prompt dict needs one of prompt, prompt_token_ids")
                if "prompt" in p:
                    text = p["prompt"]
                    if not isinstance(text, str):
                        raise ConfigError(f"request {i}: prompt: must be a string, got {type(text).__name__}")
                else:
                    ids = p["prompt_token_ids"]
            elif isinstance(p, str):
                text = p
            else:
                ids = p
            if text is not None:
                if text == "":
                    raise ConfigError(f"request {i}: prompt: empty prompt")
                if chat:
                    text = self._chat_tokenizer().apply_chat_template(
                        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
                ids = tok.encode(text, add_special_tokens=False)
            else:
                if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):  # tensor / array
                    ids = ids.tolist()
                if not isinstance(ids, (list, tuple)):
                    raise ConfigError(f"request {i}: prompt: must be a string, a list of token ids or a "
                                      f"dict, got {type(ids).__name__}")
            out.append((text, ids))
        return out

    def check_request(self, i: int, text: str | None, ids, params) -> CheckedRequest:
        """Request ``i`` checked against the model (token ids, context, stop strings) with its
        ``SamplingConfig``; a ``ConfigError`` ``request i: FIELD: why`` otherwise."""
        model, tok = self.model, self.model.tokenizer
        vocab = model.vocab_size
        if text is None:
            if len(ids) == 0:
                raise ConfigError(f"request {i}: prompt_token_ids: empty prompt")
            for t in ids:
                if not _is_int(t) or not 0 <= t < vocab:
                    raise ConfigError(f"request {i}: prompt_token_ids: token id {t!r} outside the "
                                      f"vocabulary (0..{vocab - 1})")
        if len(ids) >= model.max_positions:
            raise ConfigError(f"request {i}: prompt: {len(ids)} tokens, but the model's context is "
                              f"{model.max_positions} (max_position_embeddings); shorten the prompt")
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"request {i}: sampling_params: must be a SamplingParams, got {type(params).__name__}")
        try:
            params.validate()  # again: a SamplingParams may have been changed since it was made
            for t in params.stop_token_ids or ():
                if t >= vocab:
                    raise ConfigError(f"stop_token_ids: token id {t} outside the vocabulary (0..{vocab - 1})")
            for s in params.stop_strings:  # non-empty strings (validate)
                enc = tok.encode(s, add_special_tokens=False)
                if not enc:
                    raise ConfigError(f"stop: {s!r} encodes to no tokens, so it can never be generated")
                if model.mask_token_id in enc:
                    raise ConfigError(f"stop: {s!r} contains the mask token, which is never generated")
            config = params.to_sampling_config(model)
        except ConfigError as e:
            raise ConfigError(f"request {i}: {e}") from None
        return CheckedRequest(text, [int(t) for t in ids], params, config)

    def _run(self, parsed, sampling_params) -> list[RequestOutput]:
        n = len(parsed)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * n
        elif not isinstance(sampling_params, (list, tuple)) or len(sampling_params) != n:
            got = len(sampling_params) if isinstance(sampling_params, (list, tuple)) else type(sampling_params).__name__
            raise ConfigError(f"sampling_params: {got} for {n} prompts; pass one SamplingParams or one per prompt")
        requests = [self.check_request(i, text, ids, p) for i, ((text, ids), p) in enumerate(zip(parsed, sampling_params))]
        # Every check is done: now decode.
        jobs = []  # (request, sample, seed)
        for i, r in enumerate(requests):
            for j in range(r.params.n):
                seed = derive_seed(r.params.seed, i, j) if r.params.seed is not None else secrets.randbits(63)
                jobs.append((i, j, seed))
        traces = self._decode(requests, jobs)
        outputs = []
        for i, r in enumerate(requests):
            samples = [self._completion(j, traces[(i, j)], r) for j in range(r.params.n)]
            outputs.append(RequestOutput(str(self._next_id), r.prompt, r.ids, samples))
            self._next_id += 1
        return outputs

    def _decode(self, requests: list[CheckedRequest], jobs) -> dict[tuple[int, int], Generation]:
        out = {}
        on_engine = [job for job in jobs if _uses_engine(self.model, requests[job[0]].config)]
        if on_engine:
            gens = self.engine.generate([requests[i].ids for i, _, _ in on_engine],
                                        [requests[i].config for i, _, _ in on_engine],
                                        seeds=[seed for _, _, seed in on_engine])
            out.update({(i, j): g for (i, j, _), g in zip(on_engine, gens)})
        groups: dict[int, list] = {}  # requests sharing a SamplingParams share a config
        for job in jobs:
            if (job[0], job[1]) not in out:
                groups.setdefault(id(requests[job[0]].params), []).append(job)
        for members in groups.values():
            config = requests[members[0][0]].config
            gens = generate(self.model, [requests[i].ids for i, _, _ in members], config,
                            seeds=[seed for _, _, seed in members])
            out.update({(i, j): g for (i, j, _), g in zip(members, gens)})
        return out

    def _completion(self, j: int, gen: Generation, r: CheckedRequest) -> CompletionOutput:
        params = r.params
        ids = gen.response_ids
        text, stop_reason = self.completion_text(ids, gen.finish_reason, r)
        lps = gen.logprobs if params.wants_logprobs else None
        return CompletionOutput(
            index=j, text=text, token_ids=list(ids), finish_reason=gen.finish_reason, stop_reason=stop_reason,
            logprobs=lps, cumulative_logprob=float(sum(lps)) if lps is not None else None,
            step_map=gen.step_map, nfe=gen.nfe, trace=gen,
        )

    def completion_text(self, ids: list[int], finish_reason: str, r: CheckedRequest) -> tuple[str, str | int | None]:
        """(text, stop_reason) of a finished response: decoded (special tokens skipped unless
        asked), cut before the stop string that ended it unless ``include_stop_str_in_output``."""
        tok, config, params = self.model.tokenizer, r.config, r.params
        text = tok.decode(ids, skip_special_tokens=params.skip_special_tokens)
        stop_reason = None
        if finish_reason == "stop":
            stop_ids = config.stop_token_ids if config.stop_token_ids is not None else default_stop_ids(self.model)
            if ids and ids[-1] in stop_ids:  # a stop string always ends before the block's first stop token
                stop_reason = ids[-1]
            else:
                stop_reason = first_stop(tok.decode(ids, skip_special_tokens=False), config.stop)
                at = text.find(stop_reason) if stop_reason is not None else -1
                if at >= 0:  # not found only if the string spans a skipped special token
                    text = text[:at + (len(stop_reason) if params.include_stop_str_in_output else 0)]
        return text, stop_reason


__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
