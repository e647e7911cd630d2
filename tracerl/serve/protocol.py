"""OpenAI's request and response shapes for ``/v1/completions`` and ``/v1/chat/completions``.

Parsing is by hand rather than by a pydantic model so that every refusal is OpenAI's error
object with the offending field in ``param`` and a one-line message (``APIError``).  A field the
API defines but tracerl cannot honour (``echo``, penalties, ``logit_bias``, tools, top-k log-probs)
is refused when set to a non-neutral value, rather than silently ignored; an unknown field is
refused too (a typo such as ``max_token`` would otherwise run with the default).  Field names and
shapes follow the OpenAI API reference (platform.openai.com/docs/api-reference) and vLLM's
extensions (``top_k``, ``stop_token_ids``, ``ignore_eos``, ``skip_special_tokens``,
``include_stop_str_in_output``); the diffusion options (``block_size``, ``steps``, ``strategy``,
``threshold``, ``eb_threshold``, ``full_cache``) and ``return_trace`` are tracerl's.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import time
from dataclasses import dataclass, field

from tracerl.errors import ConfigError
from tracerl.generation.seeds import derive_seed
from tracerl.llm import LLM, CheckedRequest, SamplingParams


class APIError(Exception):
    """An HTTP error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Fields of both routes, with tracerl's SamplingParams name where it differs.
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "n": "n", "stop": "stop", "seed": "seed",
             "top_k": "top_k", "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos",
             "skip_special_tokens": "skip_special_tokens",
             "include_stop_str_in_output": "include_stop_str_in_output", "block_size": "block_size",
             "steps": "steps", "strategy": "strategy", "threshold": "threshold", "eb_threshold": "eb_threshold",
             "full_cache": "full_cache"}
_COMMON = {"model", "stream", "stream_options", "return_trace", "max_tokens", "logprobs", "user",
           "frequency_penalty", "presence_penalty", "logit_bias", *_SAMPLING}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                         "tool_choice", "parallel_tool_calls", "functions", "function_call", "metadata", "store",
                         "service_tier", "modalities"}
# Accepted only at their neutral value (they change nothing then).
_NEUTRAL = {"frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "echo": (None, False),
            "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
            "function_call": (None, "none"), "modalities": (None, ["text"])}
_CHAT_ROLES = {"system", "developer", "user", "assistant"}


@dataclass
class ServeRequest:
    """A request, parsed and checked: one ``CheckedRequest`` per prompt, the sampling seeds of
    every sample (prompt i, sample j), and the response options."""

    kind: str  # "completion" or "chat"
    model: str
    requests: list[CheckedRequest]
    seeds: list[list[int]]
    stream: bool = False
    include_usage: bool = False
    return_trace: bool = False
    logprobs: bool = False
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def samples(self) -> int:
        return sum(len(s) for s in self.seeds)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.ids) for r in self.requests)


@dataclass
class Limits:
    """What the server accepts (``ServeConfig``'s limits)."""

    served_names: tuple[str, ...]
    max_tokens_cap: int
    max_n: int
    max_samples: int  # samples one request may hold: the engine's running + waiting capacity


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _param_of(message: str) -> tuple[str | None, str]:
    """``request 0: stop: why`` -> ("stop", "stop: why")."""
    message = re.sub(r"^request \d+: ", "", message)
    m = re.match(r"([a-z_]+)(?:, [a-z_]+)*: ", message)
    return (m.group(1) if m else None), message


def _check_fields(body: dict, allowed: set[str], route: str) -> None:
    for key in body:
        if key not in allowed:
            raise APIError(400, f"{key}: unknown field for {route}", param=key, code="unknown_field")
    for key, neutral in _NEUTRAL.items():
        if key in body and body[key] not in neutral:
            raise APIError(400, f"{key}: not supported by tracerl (diffusion decoding); leave it unset",
                           param=key, code="unsupported")
    if body.get("logit_bias"):
        raise APIError(400, "logit_bias: not supported by tracerl; leave it unset", param="logit_bias",
                       code="unsupported")


def _model(body: dict, limits: Limits) -> str:
    name = body.get("model")
    if name is None:
        return limits.served_names[0]
    if not isinstance(name, str):
        raise APIError(400, f"model: must be a string, got {type(name).__name__}", param="model")
    if name not in limits.served_names:
        raise APIError(404, f"model: the model `{name}` does not exist; this server serves "
                            f"{', '.join(limits.served_names)}", param="model", code="model_not_found")
    return name


def _bool(body: dict, key: str) -> bool:
    v = body.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise APIError(400, f"{key}: must be true or false, got {v!r}", param=key)
    return v


def _stream_options(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise APIError(400, "stream_options: only allowed with stream: true", param="stream_options")
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise APIError(400, "stream_options: must be an object with include_usage", param="stream_options")
    include = opts.get("include_usage", False)
    if not isinstance(include, bool):
        raise APIError(400, f"stream_options.include_usage: must be true or false, got {include!r}",
                       param="stream_options")
    return include


def _params(body: dict, defaults: SamplingParams, max_tokens_key: str, limits: Limits) -> SamplingParams:
    """The request's SamplingParams: the server's defaults, overridden by the fields given."""
    changes = {name: body[key] for key, name in _SAMPLING.items() if body.get(key) is not None}
    max_tokens = body.get(max_tokens_key)
    if max_tokens is not None:
        if not _is_int(max_tokens) or max_tokens < 1:
            raise APIError(400, f"{max_tokens_key}: must be an integer >= 1, got {max_tokens!r}", param=max_tokens_key)
        if max_tokens > limits.max_tokens_cap:
            raise APIError(400, f"{max_tokens_key}: {max_tokens} is above this server's cap of "
                                f"{limits.max_tokens_cap}", param=max_tokens_key)
        changes["max_tokens"] = max_tokens
    n = changes.get("n", defaults.n)
    if _is_int(n) and n > limits.max_n:
        raise APIError(400, f"n: {n} is above this server's cap of {limits.max_n}", param="n")
    if "stop" in changes and isinstance(changes["stop"], list) and not all(isinstance(s, str) for s in changes["stop"]):
        raise APIError(400, "stop: must be a string or a list of strings", param="stop")
    try:
        return dataclasses.replace(defaults, **changes)
    except (ConfigError, TypeError) as e:
        param, message = _param_of(str(e))
        if param == "max_tokens":
            param, message = max_tokens_key, max_tokens_key + message[len("max_tokens"):]
        raise APIError(400, message, param=param) from None


def _logprobs(body: dict, kind: str) -> bool:
    v = body.get("logprobs")
    if kind == "completion":
        if v is None:
            return False
        if not _is_int(v) or v != 0:
            raise APIError(400, f"logprobs: only the sampled token's log-prob is available, so logprobs must be 0 "
                                f"(or unset), got {v!r}", param="logprobs")
        return True
    top = body.get("top_logprobs")
    if top not in (None, 0):
        raise APIError(400, f"top_logprobs: only the sampled token's log-prob is available, so top_logprobs must "
                            f"be 0 (or unset), got {top!r}", param="top_logprobs")
    if v is None:
        return False
    if not isinstance(v, bool):
        raise APIError(400, f"logprobs: must be true or false, got {v!r}", param="logprobs")
    return v


def _completion_prompts(body: dict) -> list:
    if "prompt" not in body or body["prompt"] is None:
        raise APIError(400, "prompt: required", param="prompt")
    p = body["prompt"]
    if isinstance(p, str) or (isinstance(p, list) and p and all(_is_int(t) for t in p)):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return list(p)
    if isinstance(p, list) and p and all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p):
        return list(p)
    raise APIError(400, "prompt: must be a non-empty string, a list of strings, a list of token ids or a "
                        "list of token-id lists", param="prompt")


def _message_text(m: dict, i: int) -> str:
    content = m.get("content")
    if content is None and m.get("role") == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content[{k}]: only text parts ({{'type': 'text', 'text': ...}}) "
                                    f"are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"messages[{i}].content: must be a string or a list of text parts", param="messages")


def _conversation(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages: required, a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}]: must be an object with role and content", param="messages")
        role = m.get("role")
        if role not in _CHAT_ROLES:
            raise APIError(400, f"messages[{i}].role: must be one of {', '.join(sorted(_CHAT_ROLES))}, got {role!r}",
                           param="messages")
        out.append({"role": "system" if role == "developer" else role, "content": _message_text(m, i)})
    return out


def parse(body, kind: str, llm: LLM, defaults: SamplingParams, limits: Limits) -> ServeRequest:
    """A request body (parsed JSON) -> ``ServeRequest``, or an ``APIError`` naming the field."""
    route = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
    if not isinstance(body, dict):
        raise APIError(400, "body: must be a JSON object", param=None)
    _check_fields(body, COMPLETION_FIELDS if kind == "completion" else CHAT_FIELDS, route)
    model = _model(body, limits)
    stream = _bool(body, "stream")
    include_usage = _stream_options(body, stream)
    return_trace = _bool(body, "return_trace")
    logprobs = _logprobs(body, kind)
    if kind == "chat":
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise APIError(400, "response_format: only {'type': 'text'} is supported", param="response_format")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    else:
        key = "max_tokens"
        if body.get("best_of") not in (None, 1, body.get("n")):
            raise APIError(400, "best_of: not supported (must be unset, 1 or equal to n)", param="best_of")
    params = _params(body, defaults, key, limits)
    if logprobs:
        params = dataclasses.replace(params, logprobs=True)
    try:
        if kind == "chat":
            conversation = _conversation(body)
            try:
                parsed = [llm.render_chat(conversation)]
            except ConfigError:
                raise
            except Exception as e:  # the template itself refused the conversation (jinja raise_exception)
                raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None
        else:
            parsed = llm.parse_prompts(_completion_prompts(body))
        checked = [llm.check_request(i, text, ids, params) for i, (text, ids) in enumerate(parsed)]
    except ConfigError as e:
        param, message = _param_of(str(e))
        prompt_key = "messages" if kind == "chat" else "prompt"
        named = {"prompt_token_ids": prompt_key, "prompt": prompt_key, "chat_template": prompt_key,
                 "max_tokens": key}.get(param, param)
        if named != param:  # the message speaks the request's field names
            message = named + message[len(param):]
        raise APIError(400, message, param=named) from None
    context = llm.model.max_positions
    for i, r in enumerate(checked):
        # vLLM's rule: a request must fit the context whole; when max_tokens was not given, it is
        # cut to what the context leaves.
        room = context - len(r.ids)
        if r.params.max_tokens > room:
            if body.get(key) is not None:
                raise APIError(400, f"{key}: the prompt has {len(r.ids)} tokens and {key} is {r.params.max_tokens}, "
                                    f"but the model's context is {context} tokens", param=key)
            checked[i] = llm.check_request(i, r.prompt, r.ids, dataclasses.replace(r.params, max_tokens=room))
    samples = sum(r.params.n for r in checked)
    if samples > limits.max_samples:
        raise APIError(400, f"n: {samples} samples in one request, more than this server holds at once "
                            f"({limits.max_samples}); lower n or send fewer prompts", param="n")
    seeds = [[derive_seed(r.params.seed, i, j) if r.params.seed is not None else secrets.randbits(63)
              for j in range(r.params.n)] for i, r in enumerate(checked)]
    return ServeRequest(kind, model, checked, seeds, stream, include_usage, return_trace, logprobs)


# -- responses ------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_body(kind: str, tokenizer, token_ids: list[int], logprobs: list[float]) -> dict:
    """OpenAI's log-prob object for the sampled tokens (no alternatives)."""
    pieces = [tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]
    if kind == "chat":
        return {"content": [{"token": p, "logprob": lp, "bytes": list(p.encode("utf-8")), "top_logprobs": []}
                            for p, lp in zip(pieces, logprobs)], "refusal": None}
    offsets, at = [], 0
    for p in pieces:
        offsets.append(at)
        at += len(p)
    return {"tokens": pieces, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}


def envelope(req: ServeRequest, choices: list[dict], *, chunk: bool = False, usage_body: dict | None = None) -> dict:
    if req.kind == "chat":
        obj, prefix = ("chat.completion.chunk" if chunk else "chat.completion"), "chatcmpl-"
    else:
        obj, prefix = "text_completion", "cmpl-"
    out = {"id": prefix + req.id, "object": obj, "created": req.created, "model": req.model, "choices": choices,
           "system_fingerprint": None}
    if not chunk or req.include_usage:
        out["usage"] = usage_body
    return out


def choice(req: ServeRequest, index: int, text: str | None, finish_reason: str | None, *, delta: bool = False,
           logprobs: dict | None = None, trace: dict | None = None, role: bool = False,
           stop_reason=None) -> dict:
    """One choice of a response (``delta``: of a stream chunk)."""
    if req.kind == "chat":
        if delta:
            body = {"index": index, "delta": ({"role": "assistant", "content": text} if role else
                                              ({"content": text} if text is not None else {})),
                    "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            body = {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish_reason}
    else:
        body = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    if finish_reason is not None:
        body["stop_reason"] = stop_reason  # vLLM's field: the stop string or token id that ended it
    if trace is not None:
        body["tracerl"] = trace
    return body
