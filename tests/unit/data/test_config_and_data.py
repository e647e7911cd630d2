"""Typed configs with dotted overrides, JSONL validation, task sources and templates."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from tracerl.config import load_config
from tracerl.data.jsonl import DataError, read_jsonl
from tracerl.data.tasks import TaskConfig, load_problems, split_of
from tracerl.data.templates import MATH_COT, instruction, render_prompt
from tracerl.errors import ConfigError
from tracerl.eval import EvalConfig, pass_at_k
from tracerl.generation import SamplingConfig
from tracerl.models.tokenizer import build_tiny_tokenizer


@dataclass
class Inner:
    steps: int = 4
    rate: float = 0.5
    name: str = "x"
    flag: bool = False
    ids: list[int] = field(default_factory=list)
    maybe: int | None = None


@dataclass
class Outer:
    model: str = "tiny-block"
    inner: Inner = field(default_factory=Inner)


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ninner:\n  steps: 8\n  rate: 1\n")
    cfg = load_config(Outer, path, ["inner.flag=true", "inner.ids=[1, 2]", "inner.name=hello world",
                                    "inner.maybe=null", "inner.rate=0.25"])
    assert cfg == Outer("m", Inner(8, 0.25, "hello world", True, [1, 2], None))
    assert isinstance(load_config(Outer, path).inner.rate, float)  # 1 -> 1.0


@pytest.mark.parametrize("override,words", [
    (["inner.stepz=3"], ["inner.stepz", "steps", "rate"]),  # unknown key lists the valid ones
    (["modle=x"], ["modle", "model", "inner"]),
    (["inner.steps=abc"], ["inner.steps", "integer"]),
    (["inner.steps=1.5"], ["inner.steps", "integer"]),
    (["inner.flag=3"], ["inner.flag", "true or false"]),
    (["inner.steps=true"], ["inner.steps", "integer"]),
    (["inner=5"], ["inner", "section"]),
    (["inner.ids=[1, x]"], ["inner.ids[1]"]),
    (["novalue"], ["key=value"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(Outer, None, override)
    for w in words:
        assert w in str(e.value)


def test_bad_yaml_file_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\ninner:\n  steps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_nested_library_dataclasses_validate():
    cfg = load_config(EvalConfig, None, ["sampling.strategy=dynamic", "sampling.threshold=0.8", "n=4", "k=[1, 4]",
                                         "task.params={max_terms: 2}"])
    assert isinstance(cfg.sampling, SamplingConfig) and cfg.sampling.threshold == 0.8
    assert cfg.task.params == {"max_terms": 2}
    with pytest.raises(ConfigError, match="strategy"):
        load_config(EvalConfig, None, ["sampling.strategy=fastest"])
    with pytest.raises(ConfigError, match="pass@8"):
        load_config(EvalConfig, None, ["n=4", "k=[8]"])
    with pytest.raises(ConfigError, match="task.source"):
        load_config(EvalConfig, None, ["task.source=web"])


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # 1 - C(7,2)/C(10,2) = 1 - 21/45
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)
    assert pass_at_k(4, 3, 2) == 1.0  # any 2 of 4 include a correct one


# -- JSONL ----------------------------------------------------------------------------------


def write_lines(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def test_jsonl_errors_name_file_line_and_field(tmp_path):
    f = write_lines(tmp_path / "math.jsonl", [
        {"question": "1+1", "ground_truth_answer": "2"},
        {"question": "2+2"},
        '{"question": "broken"',
        {"question": 5, "ground_truth_answer": "3"},
    ])
    with pytest.raises(DataError, match=r"math\.jsonl:2: missing field 'ground_truth_answer'"):
        load_problems(TaskConfig(source="jsonl", name=str(f)))
    cfg = TaskConfig(source="jsonl", name=str(f), skip_bad_rows=True)
    problems = load_problems(cfg)
    assert [p.question for p in problems] == ["1+1"]
    rows = read_jsonl(f, lambda r, w: None, skip_bad_rows=True)
    assert [line for line, _ in rows.skipped] == [3] and [line for line, _ in rows.rows] == [1, 2, 4]
    assert "invalid JSON" in rows.skipped[0][1]


def test_skipped_task_rows_are_reported_with_their_lines(tmp_path, caplog):
    """task.skip_bad_rows: used to drop rows without a word; bad bytes are a skippable bad row too."""
    f = tmp_path / "math.jsonl"
    f.write_bytes(b'{"question": "1+1", "ground_truth_answer": "2"}\n{"question": "2+2"}\n'
                  b'{"question": "caf\xe9", "ground_truth_answer": "3"}\n')
    with caplog.at_level("WARNING", logger="tracerl"):
        problems = load_problems(TaskConfig(source="jsonl", name=str(f), skip_bad_rows=True))
    assert [p.question for p in problems] == ["1+1"]
    (message,) = [r.getMessage() for r in caplog.records if r.name.startswith("tracerl")]
    assert message.startswith(f"task {f}: skipped 2 bad row(s): {f}:2: missing field 'ground_truth_answer'; "
                              f"{f}:3: not UTF-8 text (byte 0xe9 at offset 85)")


def test_a_datasets_file_that_is_not_utf8_names_the_line_and_byte(tmp_path):
    f = tmp_path / "qa.csv"
    f.write_bytes(b"question,ground_truth_answer\nWhat is 2+2?,4\nCombien co\xfbte,9\n")
    with pytest.raises(DataError, match=rf"^{f}:3: not UTF-8 text \(byte 0xfb at offset 54\)"):
        load_problems(TaskConfig(source="datasets", name=str(f)))


def test_code_jsonl_schema(tmp_path):
    f = write_lines(tmp_path / "code.jsonl", [
        {"question": "add", "test_method": "function", "test_list": ["assert add(1, 2) == 3"], "prefix": "def add(a, b):\n"},
        {"question": "echo", "test_method": "stdio", "test_input": ["1\n"], "test_output": ["1\n"], "test_time_limit": 2},
        {"question": "bad", "test_method": "stdio", "test_input": ["1\n", "2\n"], "test_output": ["1\n"]},
        {"question": "bad2", "test_method": "telepathy", "test_list": []},
    ])
    with pytest.raises(DataError, match=r"code\.jsonl:3: 'test_input' has 2 items but 'test_output' has 1"):
        load_problems(TaskConfig(source="jsonl", name=str(f)))
    problems = load_problems(TaskConfig(source="jsonl", name=str(f), skip_bad_rows=True))
    assert [p.kind for p in problems] == ["code", "code"]
    assert problems[0].prefix.startswith("def add") and problems[1].code_style == "stdio"
    assert problems[1].tests["test_time_limit"] == 2


def test_datasets_source_reads_local_csv(tmp_path):
    f = tmp_path / "qa.csv"
    f.write_text("problem,solution\nWhat is 2+2?,4\nWhat is 3*3?,9\n")
    problems = load_problems(TaskConfig(source="datasets", name=str(f), question_field="problem",
                                        answer_field="solution", kind="math"))
    assert [(p.question, p.answer) for p in problems] == [("What is 2+2?", "4"), ("What is 3*3?", "9")]


# -- reasoning-gym and HumanEval ------------------------------------------------------------


def test_gym_splits_never_overlap_and_are_reproducible():
    params = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    train = load_problems(TaskConfig(name="chain_sum", split="train", size=120, params=params))
    held = load_problems(TaskConfig(name="chain_sum", split="eval", size=30, params=params))
    assert not {p.question for p in train} & {p.question for p in held}
    assert all(split_of(p.question) == "eval" for p in held)
    again = load_problems(TaskConfig(name="chain_sum", split="eval", size=30, params=params))
    assert [p.question for p in again] == [p.question for p in held]
    other_seed = load_problems(TaskConfig(name="chain_sum", split="train", size=120, seed=5, params=params))
    assert not {p.question for p in other_seed} & {p.question for p in held}


def test_skip_drops_the_problems_a_smaller_task_holds(tmp_path):
    """task.skip validates on problems another phase never trained on: the skipped ones are
    exactly those of the same task with size=skip (gym and files alike)."""
    params = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+"]}
    seen = load_problems(TaskConfig(name="basic_arithmetic", split="train", size=40, params=params))
    rest = load_problems(TaskConfig(name="basic_arithmetic", split="train", size=25, skip=40, params=params))
    both = load_problems(TaskConfig(name="basic_arithmetic", split="train", size=65, params=params))
    assert len(rest) == 25 and [p.question for p in both] == [p.question for p in seen + rest]
    assert not {p.question for p in seen} & {p.question for p in rest}
    rows = tmp_path / "m.jsonl"
    rows.write_text("".join(json.dumps({"question": f"q{i}", "ground_truth_answer": str(i)}) + "\n" for i in range(5)))
    tail = load_problems(TaskConfig(source="jsonl", name=str(rows), size=0, skip=3))
    assert [p.question for p in tail] == ["q3", "q4"]
    with pytest.raises(DataError, match="task.skip=5 leaves no problems"):
        load_problems(TaskConfig(source="jsonl", name=str(rows), size=0, skip=5))
    with pytest.raises(ConfigError, match="task.skip"):
        TaskConfig(skip=-1)


def test_gym_bad_generator_is_a_config_error():
    with pytest.raises(ConfigError, match="no_such_task"):
        load_problems(TaskConfig(name="no_such_task", size=2))


def test_humaneval_source():
    problems = load_problems(TaskConfig(source="humaneval", size=0))
    assert len(problems) == 164 and problems[0].id == "HumanEval/0"
    assert problems[0].prefix == problems[0].question and "check" in problems[0].tests["humaneval"]["test"]


# -- templates ------------------------------------------------------------------------------


def test_templates_and_chat_rendering():
    tok = build_tiny_tokenizer()
    user, prefix = instruction("math", "math", "What is 1+1?")
    assert user == MATH_COT.format(question="What is 1+1?") and user.endswith("within \\boxed{}.")
    think_user, think_prefix = instruction("math_think", "math", "Q")
    assert think_prefix == "<think>\n" and think_user.endswith("This is the problem:\nQ")
    ids = render_prompt(tok, user, prefix)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert tok.decode(render_prompt(tok, "Q", "", chat=False)) == "Q"
    with pytest.raises(ConfigError, match="template"):
        instruction("fancy", "math", "Q")
