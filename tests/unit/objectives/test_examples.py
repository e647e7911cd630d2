"""The typed conversion from a generation's trace (or a row) to a training example: a missing or
misnamed field is an error, never a silent left-to-right default."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from tracerl.errors import ConfigError
from tracerl.generation import SamplingConfig, generate
from tracerl.models import load_model
from tracerl.objectives import Example, as_example, as_examples


@pytest.fixture(scope="module")
def gen():
    model = load_model("tiny-full")  # full attention: the tail holds never-decoded masked positions
    [g] = generate(model, [[65, 66, 67]], SamplingConfig(max_new_tokens=8, strategy="dynamic", threshold=0.5,
                                                          stop_token_ids=(70, 71, 72, 73, 74, 75)))
    return g


def test_a_generation_becomes_its_trace(gen):
    ex = Example.from_generation(gen)
    assert (ex.prompt_ids, ex.response_ids, ex.step_map) == (gen.prompt_ids, gen.response_ids, gen.step_map)
    assert (ex.tail_ids, ex.tail_steps) == (gen.tail_ids, gen.tail_steps)
    assert as_example(gen) == ex and as_examples([gen, ex]) == [ex, ex]


def test_a_broken_trace_is_an_error_naming_it(gen):
    with pytest.raises(ConfigError, match=r"example 1: step_map: 2 values for"):
        as_examples([gen, replace(gen, step_map=gen.step_map[:2])])
    with pytest.raises(TypeError, match="expected a Generation"):
        Example.from_generation(SimpleNamespace(**vars(gen)))


def test_no_attribute_guessing_and_no_misnamed_fields():
    # An object that merely looks like a generation (e.g. with a renamed step map) is refused,
    # instead of training on the left-to-right default order.
    look_alike = SimpleNamespace(prompt_ids=[1], response_ids=[2, 3], steps=[2, 1])
    with pytest.raises(TypeError, match="cannot train on a SimpleNamespace"):
        as_example(look_alike)
    with pytest.raises(ConfigError, match=r"example: unknown field 'stepmap'; valid: prompt_ids, response_ids, step_map"):
        as_example({"prompt_ids": [1], "response_ids": [2, 3], "stepmap": [2, 1]})
    with pytest.raises(ConfigError, match=r"needs 'response_ids'"):
        as_example({"prompt_ids": [1]})
    assert as_example({"prompt_ids": [1], "response_ids": [2, 3], "step_map": [2, 1]}).steps() == [2, 1]
