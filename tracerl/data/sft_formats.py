"""SFT rows in the formats users already have, one format per file, detected from the rows.

* ``messages``: ``{"messages": [{"role", "content"}, ...]}``: a conversation (TRL's
  conversational format, OpenAI's chat fine-tuning format).  The tokenizer's chat template renders
  it and only assistant turns are supervised.  A conversation with k assistant turns gives k
  examples: the i-th has everything before its i-th assistant turn as the prompt (rendered with
  the generation prompt, exactly what the model sees when it answers) and that turn as the
  response, up to and including its end-of-turn token.  Diffusion SFT noises one response
  after one clean prompt, so a turn is trained with clean context instead of sharing a noised
  canvas with later turns.
* ``prompt-completion``: ``{"prompt", "completion"}`` (TRL's): strings, or lists of messages
  (TRL's conversational prompt-completion), then rendered like ``messages``.
* ``prompt-response``: ``{"prompt": str, "response": str[, "step_map"]}`` (tracerl's).
* ``token-ids``: ``{"prompt_ids": [...], "response_ids": [...][, "step_map"]}``.

String prompts are encoded as they are, or as a user turn of the chat template with
``data.chat: true``.  Other keys of a row (ids, sources, metadata) are allowed; a key that looks
like a misspelt field, a row of another format than the file's first row, or a row of no known
format is an error naming the file and line.
"""

from __future__ import annotations

import difflib

from tracerl.data.jsonl import DataError, check_field

FORMATS = ("messages", "prompt-completion", "prompt-response", "token-ids")
_KEYS = {"messages": ("messages",), "prompt-completion": ("prompt", "completion"),
         "prompt-response": ("prompt", "response"), "token-ids": ("prompt_ids", "response_ids")}
_FIELDS = ("messages", "prompt", "completion", "response", "prompt_ids", "response_ids", "step_map")
_ROLES = ("system", "developer", "user", "assistant")


def row_format(row: dict, where: str) -> str:
    for key in row:
        if key not in _FIELDS:
            close = difflib.get_close_matches(str(key), _FIELDS, n=1, cutoff=0.75)
            if close:  # a misspelt step_map would silently train a left-to-right order
                raise DataError(f"{where}: unknown field {key!r}; did you mean {close[0]!r}?")
    found = [f for f, keys in _KEYS.items() if all(k in row for k in keys)]
    if len(found) != 1:
        shapes = "; ".join("+".join(keys) for keys in _KEYS.values())
        what = "fields of several formats" if found else "no known format"
        raise DataError(f"{where}: {what} (keys: {', '.join(map(str, row)) or 'none'}); a row has one of: {shapes}")
    return found[0]


def _check_messages(messages, where: str, field: str, *, final_assistant: bool) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field!r}: expected a non-empty list of {{role, content}} objects")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {field}[{k}]: expected {{'role': one of {', '.join(_ROLES)}, "
                            f"'content': str}}, got {m!r}")
    if final_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field {field!r}: no assistant turn to train on")


def validate_row(row: dict, where: str, fmt: str | None = None) -> str:
    """The row's format, checked (and equal to ``fmt`` when given: the file's format)."""
    got = row_format(row, where)
    if fmt is not None and got != fmt:
        raise DataError(f"{where}: a {got} row in a {fmt} file (the format of its first row); one format per file")
    if got == "messages":
        _check_messages(row["messages"], where, "messages", final_assistant=True)
    elif got == "prompt-completion":
        for name in ("prompt", "completion"):
            if not isinstance(row[name], str):
                _check_messages(row[name], where, name, final_assistant=name == "completion")
        if isinstance(row["prompt"], str) != isinstance(row["completion"], str):
            raise DataError(f"{where}: prompt and completion must both be strings or both lists of messages")
    elif got == "prompt-response":
        check_field(row, "prompt", str, where)
        check_field(row, "response", str, where)
    else:
        check_field(row, "prompt_ids", list, where)
        check_field(row, "response_ids", list, where)
    if "step_map" in row:
        if got not in ("prompt-response", "token-ids"):
            raise DataError(f"{where}: step_map goes with prompt/response or prompt_ids/response_ids rows")
        check_field(row, "step_map", list, where)
    return got


class FileFormat:
    """Validator for ``read_jsonl``: the first row fixes the file's format."""

    def __init__(self) -> None:
        self.format: str | None = None

    def __call__(self, row: dict, where: str) -> None:
        fmt = validate_row(row, where, self.format)
        self.format = self.format or fmt


def _render(tok, messages: list[dict], generation_prompt: bool) -> str:
    msgs = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in messages]
    return tok.apply_chat_template(msgs, add_generation_prompt=generation_prompt, tokenize=False)


def _conversation_examples(tok, messages: list[dict], where: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per assistant turn (see the module docstring)."""
    if not getattr(tok, "chat_template", None):
        raise DataError(f"{where}: messages rows need a tokenizer with a chat template; this one has none")
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tok, messages[:i], True) if i else ""
        full = _render(tok, messages[:i + 1], False)
        if not full.startswith(prompt):
            raise DataError(f"{where}: the chat template renders turn {i} in a way that does not extend the "
                            f"conversation before it; cannot split prompt and response")
        response = full[len(prompt):].rstrip("\n")  # the turn through its end-of-turn token
        out.append((tok.encode(prompt, add_special_tokens=False), tok.encode(response, add_special_tokens=False)))
    return out


def encode_row(tok, row: dict, fmt: str, where: str, *, chat: bool, eos: list[int]) -> list[tuple]:
    """(prompt ids, response ids, step map or None) examples of one row."""
    if fmt == "token-ids":
        return [(row["prompt_ids"], row["response_ids"], row.get("step_map"))]
    if fmt == "messages":
        return [(p, r + eos, None) for p, r in _conversation_examples(tok, row["messages"], where)]
    prompt, response = row["prompt"], row["completion" if fmt == "prompt-completion" else "response"]
    if isinstance(prompt, list):  # conversational prompt-completion: only the completion's assistant turns
        in_prompt = sum(m["role"] == "assistant" for m in prompt)
        return [(p, r + eos, None) for p, r in _conversation_examples(tok, prompt + response, where)[in_prompt:]]
    if chat:
        if not getattr(tok, "chat_template", None):
            raise DataError(f"{where}: data.chat is set but the tokenizer has no chat template")
        prompt = _render(tok, [{"role": "user", "content": prompt}], True)
    return [(tok.encode(prompt, add_special_tokens=False), tok.encode(response, add_special_tokens=False) + eos,
             row.get("step_map"))]

