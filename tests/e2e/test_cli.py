"""The command line's config surface: sampling options generated from SamplingConfig, config keys
in --help, `tracerl config CMD`, no silent runs on built-in defaults, and the config-describing
helpers behind them (describe_fields, config_entries, default_yaml)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import pytest

from tracerl.cli import build_parser, default_config
from tracerl.config import config_entries, default_yaml, describe_fields, format_value, load_config
from tracerl.errors import TracerlError
from tracerl.generation.config import SamplingConfig


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tracerl.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def flat(text: str) -> str:
    return " ".join(text.split())  # argparse wraps help lines wherever it likes


# -- describe_fields / config_entries / default_yaml ------------------------------------------------


@dataclass
class Inner:
    depth: int = 2  # how deep
    label: str = "a # not a comment"  # the real comment
    note: str = " {answer}"


@dataclass
class Outer:
    name: str = "x"  # the name
    plain: float = 1.5
    inner: Inner = field(default_factory=lambda: Inner(depth=3))  # a nested section
    ids: tuple[int, ...] | None = (1, 2)  # a tuple
    weights: list[float] = field(
        default_factory=lambda: [0.5, 1.0])  # on the field's last line
    params: dict = field(default_factory=lambda: {"k": [1, 2], "sub": {"yes": "no"}})  # free-form
    empty: dict = field(default_factory=dict)
    maybe: int | None = None  # None: off
    # A comment above a field is not its description.
    tricky: str = "yes"


@dataclass
class Derived(Outer):
    plain: float = 2.5  # redeclared with its own comment
    name: str = "y"
    extra: bool = True  # added


def test_describe_fields_reads_trailing_comments():
    assert describe_fields(Inner) == {"depth": "how deep", "label": "the real comment", "note": ""}
    described = describe_fields(Outer)
    assert list(described) == [f.name for f in dataclasses.fields(Outer)]
    assert described["name"] == "the name" and described["plain"] == ""
    assert described["inner"] == "a nested section" and described["weights"] == "on the field's last line"
    assert described["maybe"] == "None: off" and described["tricky"] == "" and described["empty"] == ""
    assert describe_fields(Outer()) == described  # an instance works too


def test_describe_fields_inheritance_local_classes_and_no_source():
    described = describe_fields(Derived)
    assert described["plain"] == "redeclared with its own comment"
    assert described["name"] == "the name"  # redeclared without a comment: the base's
    assert described["extra"] == "added" and described["inner"] == "a nested section"

    @dataclass
    class Local:
        a: int = 1  # defined in a function
        b: str = """multi
line"""  # after a multi-line string

    assert describe_fields(Local) == {"a": "defined in a function", "b": "after a multi-line string"}
    made = dataclasses.make_dataclass("Made", [("z", int, field(default=0))])  # no source at all
    assert describe_fields(made) == {"z": ""}
    with pytest.raises(TypeError):
        describe_fields(int)


def test_config_entries_flattens_sections():
    entries = config_entries(Outer)
    keys = [k for k, _, _ in entries]
    assert keys == ["name", "plain", "inner.depth", "inner.label", "inner.note", "ids", "weights", "params.k",
                    "params.sub.yes", "empty", "maybe", "tricky"]
    as_dict = {k: (v, d) for k, v, d in entries}
    assert as_dict["inner.depth"] == (3, "how deep")  # the default_factory's instance, not Inner's default
    assert as_dict["empty"] == ({}, "") and as_dict["maybe"] == (None, "None: off")
    changed = Outer(inner=Inner(depth=7), empty={"a": 1})
    as_dict = {k: v for k, v, _ in config_entries(changed)}
    assert as_dict["inner.depth"] == 7 and as_dict["empty.a"] == 1

    @dataclass
    class Required:
        need: int  # no default
        have: int = 1

    assert config_entries(Required) == [("need", dataclasses.MISSING, "no default"), ("have", 1, "")]
    # SamplingConfig: every option, with the dataclass defaults
    sampling = {k: v for k, v, _ in config_entries(SamplingConfig)}
    assert sampling == asdict(SamplingConfig())


def test_default_yaml_is_commented_and_round_trips(tmp_path):
    config = Outer(name="1e-3", tricky="null", inner=Inner(note="two\nlines"), maybe=4)
    text = default_yaml(config)
    lines = text.splitlines()
    assert "name: 1e-3  # the name" in lines and "inner:  # a nested section" in lines
    assert "  depth: 2  # how deep" in lines and "plain: 1.5" in lines
    assert "  label: 'a # not a comment'  # the real comment" in lines
    assert "params:  # free-form" in lines and "  sub:" in lines and "empty: {}" in lines
    path = tmp_path / "outer.yaml"
    path.write_text(text)
    assert load_config(Outer, path) == config
    path.write_text(default_yaml(Derived()))
    assert load_config(Derived, path) == Derived()
    assert format_value(None) == "null" and format_value((1, 2)) == "[1, 2]" and format_value(" x") == "' x'"


@pytest.mark.parametrize("command", ["eval", "sft", "rl", "quickstart"])
def test_command_configs_round_trip(command, tmp_path, capsys):
    from tracerl.cli import main

    assert main(["config", command]) == 0
    text = capsys.readouterr().out
    path = tmp_path / f"{command}.yaml"
    path.write_text(text)
    expected = default_config(command)
    loaded = load_config(type(expected), path)
    if command == "rl":  # the algorithm sections come back as mappings
        assert set(loaded.policy.options) >= {"tracerl", "random_masking", "coupled"}
        expected.policy.options = {k: asdict(v) for k, v in expected.policy.options.items()}
    assert loaded == expected
    if command == "quickstart":
        from tracerl.recipes.quickstart import load_quickstart_config

        assert loaded == load_quickstart_config()  # the recipe's values, not the schema's


# -- sampling options --------------------------------------------------------------------------------


def test_sampling_options_come_from_the_dataclass():
    from tracerl.cli import _sampling_config

    parser = build_parser()
    args = parser.parse_args(["generate", "--prompt", "x"])
    assert _sampling_config(args) == SamplingConfig()
    assert _sampling_config(args, return_logprobs=True) == SamplingConfig(return_logprobs=True)
    args = parser.parse_args(["generate", "--prompt", "x", "--no-cache", "--stop-token-ids", "5", "7",
                              "--eb-threshold", "0.5", "--block-size", "2", "--seed", "3"])
    assert _sampling_config(args) == SamplingConfig(use_cache=False, stop_token_ids=(5, 7), eb_threshold=0.5,
                                                    block_size=2, seed=3)
    for argv, use_cache in ([], True), (["--no-use-cache"], False), (["--no-cache", "--use-cache"], True):
        args = parser.parse_args(["trace", "--prompt", "x", "--html", "t.html", *argv])
        assert args.use_cache is use_cache
    assert parser.parse_args(["generate", "--prompt", "x", "--stop-token-ids"]).stop_token_ids == []
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--prompt", "x", "--strategy", "fastest"])


def test_chat_prompt_is_render_prompt():
    from tracerl.cli import _encode_prompt
    from tracerl.data.templates import render_prompt
    from tracerl.models import load_model

    model = load_model("tiny-block")
    assert _encode_prompt(model, "Hi", chat=True) == render_prompt(model.tokenizer, "Hi", chat=True)
    assert _encode_prompt(model, "Hi", chat=False) == model.tokenizer.encode("Hi", add_special_tokens=False)
    model.tokenizer.chat_template = None
    with pytest.raises(TracerlError, match="no chat template"):
        _encode_prompt(model, "Hi", chat=True)


def test_overrides_without_a_file_still_run(capsys):
    from tracerl.cli import main

    assert main(["eval", "n=0"]) == 2  # reaches the config (and its check), not the usage error
    assert "n: must be >= 1" in capsys.readouterr().err


# -- subprocesses (each pays the imports) ------------------------------------------------------------


def test_generate_help_shows_the_dataclass_defaults():
    out = run_cli("generate", "--help")
    assert out.returncode == 0, out.stderr
    text = flat(out.stdout)
    assert re.search(r"--max-new-tokens INT [^-]*\(default: 128\)", text) and SamplingConfig().max_new_tokens == 128
    assert "--eb-threshold FLOAT entropy_bounded: entropy budget" in text and "(default: 0.35)" in text
    assert "--use-cache, --no-use-cache" in text and "--no-cache" in text and "--stop-token-ids [INT ...]" in text
    assert "--return-logprobs" not in text and "--logprobs" in text


def test_generate_with_an_empty_stop_list_runs_to_the_length():
    out = run_cli("generate", "--model", "tiny-block", "--prompt", "2+3=", "--json", "--max-new-tokens", "8",
                  "--stop-token-ids")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(data["token_ids"]) == 8 and data["finish_reason"] == "length"


@pytest.mark.parametrize("command", ["sft", "rl", "eval"])
def test_no_config_is_a_usage_error_that_starts_nothing(command, tmp_path):
    out = run_cli(command, "--no-progress", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith(f"usage: tracerl {command}")
    assert lines[-1].endswith(f"give a config file or key=value overrides (`tracerl config {command}` prints "
                              "the defaults)")
    assert out.stdout == "" and list(tmp_path.iterdir()) == []


def test_config_rl_loads_back_with_every_algorithm(tmp_path):
    from tracerl.rl import RLConfig
    from tracerl.rl.algorithms import algorithm_names, make_algorithm

    out = run_cli("config", "rl")
    assert out.returncode == 0, out.stderr
    path = tmp_path / "rl.yaml"
    path.write_text(out.stdout)
    config = load_config(RLConfig, path)
    # The subprocess knows the built-in algorithms (this process may hold test plug-ins too).
    builtin = {"tracerl", "random_masking", "coupled", "d1", "wd1", "spg"}
    assert set(config.policy.options) == builtin <= set(algorithm_names())
    for name in config.policy.options:  # every section is valid for its algorithm
        config = load_config(RLConfig, path, [f"policy.method={name}"])
        assert make_algorithm(config.policy).name == name
    assert "  eps: 0.2  # PPO clip range" in out.stdout.splitlines()


def test_rl_help_lists_the_config_keys():
    out = run_cli("rl", "--help")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    eps = next(line for line in lines if line.strip().startswith("policy.eps="))
    assert eps.split() == ["policy.eps=0.2", "PPO", "clip", "range"]
    assert any(line.strip().startswith("policy.options.tracerl.shrink=1") for line in lines)
    assert any(line.strip().startswith("rollout.sampling.max_new_tokens=128") for line in lines)
