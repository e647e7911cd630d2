"""The training example every objective consumes: token ids and, optionally, the decoding trace.

An example is ``prompt_ids`` + ``response_ids`` (already ending with the stop token, if any) +
an optional ``step_map`` (per response token, the 1-based index of the sampler forward that
unmasked it, global across blocks; see generation/sampler.py).  Token ids travel between
phases, never text (DESIGN.md principle 2), so a trace can never be misaligned with its tokens
by a tokenizer round trip (upstream bug, reference notes §8.2): a step map of the wrong length
is an error here, not something to pad or truncate.

A generated example may also carry a *tail*: the canvas after the stop token as the sampler saw
it (tokens it decoded after the stop in the same block, with their steps; step 0 = a position
that stayed masked, e.g. later blocks under full attention).  The tail is never a target; trace
rows keep it as context so that each training state is exactly the state the sampler was in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tracerl.errors import ConfigError
from tracerl.generation.sampler import Generation


@dataclass
class Example:
    prompt_ids: list[int]
    response_ids: list[int]
    step_map: list[int] | None = None
    tail_ids: list[int] | None = None
    tail_steps: list[int] | None = None

    def __post_init__(self) -> None:
        self.prompt_ids = [int(t) for t in self.prompt_ids]
        self.response_ids = [int(t) for t in self.response_ids]
        if self.step_map is not None:
            self.step_map = [int(s) for s in self.step_map]
            if len(self.step_map) != len(self.response_ids):
                raise ConfigError(
                    f"step_map: {len(self.step_map)} values for {len(self.response_ids)} response "
                    "tokens; a trace must have exactly one step per response token"
                )
        self.tail_ids = [int(t) for t in self.tail_ids or []]
        self.tail_steps = [int(s) for s in self.tail_steps or []]
        if len(self.tail_ids) != len(self.tail_steps):
            raise ConfigError(f"tail_steps: {len(self.tail_steps)} values for {len(self.tail_ids)} tail tokens")
        if self.tail_ids and self.step_map is None:
            raise ConfigError("tail_ids: a tail needs the response's step_map (it is a decoding trace)")

    @classmethod
    def from_generation(cls, gen: Generation, where: str = "generation") -> Example:
        """The training example of a sampled response: its ids, step map and post-stop tail."""
        if not isinstance(gen, Generation):
            raise TypeError(f"{where}: expected a Generation, got {type(gen).__name__}")
        try:
            return cls(gen.prompt_ids, gen.response_ids, gen.step_map, gen.tail_ids, gen.tail_steps)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def steps(self) -> list[int]:
        """The step map, or the left-to-right default ``σ(j) = j + 1`` when there is none."""
        if self.step_map is not None:
            return self.step_map
        return list(range(1, len(self.response_ids) + 1))


_FIELDS = ("prompt_ids", "response_ids", "step_map", "tail_ids", "tail_steps")
_REQUIRED = ("prompt_ids", "response_ids")


def example_from_mapping(row: Mapping, where: str = "example") -> Example:
    """An ``Example`` from a mapping with exactly the fields of ``Example`` (``prompt_ids`` and
    ``response_ids`` required; ``step_map``, ``tail_ids``, ``tail_steps`` optional).  Any other
    key is an error: a misspelt ``step_map`` must not silently train a left-to-right order."""
    missing = [k for k in _REQUIRED if row.get(k) is None]
    if missing:
        raise ConfigError(f"{where}: needs {' and '.join(repr(k) for k in missing)}")
    unknown = sorted(set(row) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; valid: {', '.join(_FIELDS)}")
    try:
        return Example(list(row["prompt_ids"]), list(row["response_ids"]), row.get("step_map"),
                       row.get("tail_ids"), row.get("tail_steps"))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def as_example(item: Any, where: str = "example") -> Example:
    """An ``Example`` from an Example, a ``tracerl.generation.Generation`` (its trace: step map
    and tail, ``Example.from_generation``) or a mapping (``example_from_mapping``).  Anything else
    is a TypeError: there is no attribute guessing."""
    if isinstance(item, Example):
        return item
    if isinstance(item, Generation):
        return Example.from_generation(item, where)
    if isinstance(item, Mapping):
        return example_from_mapping(item, where)
    raise TypeError(f"{where}: cannot train on a {type(item).__name__}; pass an Example, a Generation or a "
                    f"mapping of {', '.join(_FIELDS)}")


def as_examples(items: Iterable[Any]) -> list[Example]:
    return [as_example(x, f"example {i}") for i, x in enumerate(items)]


def count_response_tokens(examples: Iterable[Any]) -> int:
    """Number of real response tokens: the loss normaliser N of an optimizer batch (loss.py)."""
    return sum(len(as_example(x).response_ids) for x in examples)
