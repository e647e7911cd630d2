"""The ``tracerl`` command.

Commands that report results accept ``--json``: the last line of stdout is then one JSON object;
progress and logs go to stderr.  User errors (bad options, bad checkpoints) exit with status 2 and
a one-line message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import types
import typing
import warnings

from tracerl.errors import TracerlError


def _quiet_libraries() -> None:
    # transformers' deprecation chatter and progress bars are noise on a CLI.
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _warnings_to_stderr(command: str):
    """A handler printing the library's warnings (e.g. a resume that skips an incomplete
    checkpoint) to stderr, one line each; the caller removes it when the command ends."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(f"tracerl {command}: warning: %(message)s"))
    logging.getLogger("tracerl").addHandler(handler)
    return handler


def _progress_mode(args: argparse.Namespace) -> str:
    """--no-progress: none; --json: plain lines on stderr (stdout holds only the JSON); else a bar
    on a terminal and plain lines elsewhere (tracerl/progress.py)."""
    if getattr(args, "no_progress", False):
        return "off"
    return "lines" if getattr(args, "json", False) else "auto"


def _emit_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


_SAMPLING_FROM_FLAGS = "return_logprobs"  # not an option of its own: generate --logprobs, trace always


def _option_kwargs(tp) -> dict:
    """argparse keywords for a config field annotated ``tp`` (``X | None`` as ``X``)."""
    from tracerl.config import parse_yaml

    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
        typing.Union, types.UnionType) else [tp]
    base = args[0] if len(args) == 1 else None
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if base in (int, float, str):
        return {"type": base, "metavar": base.__name__.upper()}
    if typing.get_origin(base) in (list, tuple):
        item = (typing.get_args(base) or (str,))[0]
        if item in (int, float, str):
            return {"nargs": "*", "type": item, "metavar": item.__name__.upper()}
        return {"nargs": "*", "type": parse_yaml, "metavar": "VALUE"}
    return {"type": parse_yaml, "metavar": "VALUE"}  # one YAML value, as in a key=value override


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    """One option per ``SamplingConfig`` field (``--max-new-tokens``, ``--use-cache/--no-use-cache``,
    ...), with the dataclass's type, default and field comment: the CLI declares no default."""
    from tracerl.config import config_entries
    from tracerl.generation.config import FULL_CACHE_MODES, STRATEGIES, SamplingConfig

    choices = {"strategy": STRATEGIES, "full_cache": FULL_CACHE_MODES}
    hints = typing.get_type_hints(SamplingConfig)
    group = p.add_argument_group("sampling options (tracerl.generation.SamplingConfig)")
    for name, default, description in config_entries(SamplingConfig):
        if name == _SAMPLING_FROM_FLAGS:
            continue
        kwargs = _option_kwargs(hints[name])
        if name in choices:
            kwargs["choices"] = choices[name]
            kwargs.pop("metavar", None)
        if kwargs.get("nargs") == "*":
            description = f"{description}; the flag alone: an empty list".lstrip("; ")
        action = group.add_argument("--" + name.replace("_", "-"), dest=name, default=default,
                                    help=description.replace("%", "%%"), **kwargs)
        if "%(default)" not in action.help:  # BooleanOptionalAction adds it itself (Python < 3.13)
            action.help = f"{action.help} (default: %(default)s)".strip()
        if name == "use_cache":  # the README's spelling
            group.add_argument("--no-cache", dest=name, action="store_false", default=argparse.SUPPRESS,
                               help="same as --no-use-cache (exact reference: no KV cache)")


def _sampling_config(args: argparse.Namespace, return_logprobs: bool = False):
    from tracerl.generation.config import SamplingConfig

    options = {name: getattr(args, name) for name in SamplingConfig.option_names() if name != _SAMPLING_FROM_FLAGS}
    return SamplingConfig(**options, return_logprobs=return_logprobs)


def _encode_prompt(model, text: str, chat: bool) -> list[int]:
    from tracerl.data.templates import render_prompt

    if text == "":
        raise TracerlError("--prompt: empty prompt")
    if chat and not getattr(model.tokenizer, "chat_template", None):
        raise TracerlError("--chat: this model's tokenizer has no chat template")
    return render_prompt(model.tokenizer, text, chat=chat)


def _generate_one(args: argparse.Namespace, return_logprobs: bool = False):
    from tracerl.generation import generate
    from tracerl.models import check_finite, load_model

    model = check_finite(load_model(args.model, device=args.device), args.model)
    config = _sampling_config(args, return_logprobs)
    prompt_ids = _encode_prompt(model, args.prompt, args.chat)
    return model, generate(model, [prompt_ids], config)[0]


def cmd_generate(args: argparse.Namespace) -> int:
    model, gen = _generate_one(args, return_logprobs=args.logprobs)
    if args.json:
        out = {
            "text": gen.text, "token_ids": gen.response_ids, "step_map": gen.step_map,
            "nfe": gen.nfe, "finish_reason": gen.finish_reason,
            "nfe_per_token": gen.nfe / max(1, len(gen.response_ids)),
            "prompt_ids": gen.prompt_ids, "block_size": gen.block_size, "family": gen.family,
        }
        if args.logprobs:
            out["logprobs"], out["confidences"] = gen.logprobs, gen.confidences
        _emit_json(out)
    else:
        print(gen.text)
        print(
            f"[{len(gen.response_ids)} tokens, {gen.nfe} forwards, finish: {gen.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from tracerl.report.trace_page import write_trace_html

    model, gen = _generate_one(args, return_logprobs=True)
    outcome = None
    if args.answer is not None:  # the math verifier's verdict, shown on the page with both answers
        from tracerl.rewards.math import score_math

        result = score_math(gen.text, args.answer)
        outcome = {"gold": args.answer, "answer": result.extracted_answer, "correct": result.correct}
    path = write_trace_html(args.html, model.tokenizer, [gen], title=args.prompt[:80],
                            outcomes=[outcome] if outcome else None)
    if args.json:
        _emit_json({"html": str(path), "tokens": len(gen.response_ids), "nfe": gen.nfe,
                    **({"correct": outcome["correct"]} if outcome else {})})
    else:
        print(path)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "generate":
        from tracerl.recipes.bench_generate import bench_generate, format_generate_table

        result = bench_generate(model_name=args.model, device=args.device, quick=args.quick,
                                progress=_progress_mode(args))
        table = format_generate_table(result)
    elif args.what == "train":
        from tracerl.recipes.bench_train import bench_train, format_train_table

        result = bench_train(quick=args.quick, progress=_progress_mode(args))
        table = format_train_table(result)
    elif args.what == "engine":
        from tracerl.recipes.bench_engine import bench_engine, format_engine_table

        result = bench_engine(model_name=args.model, device=args.device, quick=args.quick,
                              progress=_progress_mode(args))
        table = format_engine_table(result)
    else:
        raise TracerlError(f"bench: unknown benchmark {args.what!r}; valid: generate, train, engine")
    print(table, file=sys.stderr if args.json else sys.stdout)  # under --json stdout holds only the JSON
    if args.json:
        _emit_json(result)
    return 0


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    """One option per ``ServeConfig`` field (with its comment), then the default sampling
    options of requests (``tracerl generate``'s)."""
    from tracerl.config import config_entries
    from tracerl.serve.config import ServeConfig

    hints = typing.get_type_hints(ServeConfig)
    group = p.add_argument_group("server options (tracerl.serve.ServeConfig)")
    for name, default, description in config_entries(ServeConfig):
        if "." in name:  # defaults.*: the sampling options below
            continue
        action = group.add_argument("--" + name.replace("_", "-"), dest=name, default=default,
                                    help=description.replace("%", "%%"), **_option_kwargs(hints[name]))
        action.help = f"{action.help} (default: %(default)s)".strip()
    _add_sampling_options(p)
    p.description = ("Defaults of the requests' sampling fields come from the sampling options; a request's "
                     "own fields (temperature, max_tokens, block_size, ...) override them.")


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    from tracerl.serve.app import run_server
    from tracerl.serve.config import ServeConfig, defaults_from_sampling

    names = [f.name for f in dataclasses.fields(ServeConfig) if f.name != "defaults"]
    config = ServeConfig(**{name: getattr(args, name) for name in names},
                         defaults=defaults_from_sampling(_sampling_config(args)))
    run_server(config, announce=lambda line: print(line, flush=True))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from tracerl.models import load_model

    model = load_model(args.model)
    info = {
        **model.spec.to_dict(),
        "backbone": model.config.model_type,
        "parameters": model.num_parameters(),
        "vocab_size": model.vocab_size,
        "tokenizer_size": len(model.tokenizer),
        "mask_token": model.tokenizer.convert_ids_to_tokens(model.mask_token_id),
        "max_positions": model.max_positions,
        "nonfinite_parameters": model.nonfinite_parameters(),  # tensors with NaN/inf: it cannot generate
    }
    if args.json:
        _emit_json(info)
    else:
        for k, v in info.items():
            if k == "nonfinite_parameters":
                v = f"{len(v)}: {', '.join(v)}" if v else "none"
            print(f"{k:16s} {v}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from tracerl.models import load_model

    model = load_model(args.source, family=args.family, block_size=args.block_size, dtype=args.dtype)
    path = model.save_pretrained(args.output)
    if args.json:
        _emit_json({"output": str(path), **model.spec.to_dict()})
    else:
        print(f"wrote {path} ({model.spec.family}, block {model.spec.block_size}, mask id {model.mask_token_id})")
    return 0


_SHOWN_SKIPS = 20  # skipped rows listed on stderr (the summary and the output hold them all)


def cmd_score(args: argparse.Namespace) -> int:
    from tracerl.recipes.score import score_file
    from tracerl.rewards import RewardConfig, Rewards

    rewards = Rewards(RewardConfig(functions=args.reward, weights=args.reward_weights, correct_at=args.correct_at),
                      key="--reward")
    summary = score_file(args.task, args.input, args.output, skip_bad_rows=args.skip_bad_rows,
                         workers=args.workers, answer_field=args.answer_field, progress=_progress_mode(args),
                         rewards=rewards)
    skipped = summary["skipped_rows"]
    for reason in skipped[:_SHOWN_SKIPS]:
        print(f"tracerl score: skipped {reason}", file=sys.stderr)
    if len(skipped) > _SHOWN_SKIPS:
        print(f"tracerl score: ... and {len(skipped) - _SHOWN_SKIPS} more skipped rows (all in the output's "
              "'error' fields)", file=sys.stderr)
    if args.json:
        _emit_json(summary)
    else:
        figures = ("no row was scored" if summary["accuracy"] is None else
                   f"accuracy {summary['accuracy']:.4f}, mean reward {summary['mean_reward']:.4f}")
        print(f"scored {summary['scored']} rows ({summary['skipped']} skipped): {figures} -> {args.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tracerl.config import load_config
    from tracerl.eval import EvalConfig
    from tracerl.recipes.eval import run_eval

    path, overrides = _overrides_and_config(args)
    config = load_config(EvalConfig, path, overrides)
    summary = run_eval(config, progress=_progress_mode(args))
    table = "\n".join(f"{k:22s} {v:.4f}" if isinstance(v, float) else f"{k:22s} {v}"
                      for k, v in summary.items() if k != "sampling")
    print(table, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        _emit_json(summary)
    return 0


def _overrides_and_config(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    overrides = list(args.overrides)
    config = args.config
    if config and "=" in config and not os.path.exists(config):
        overrides.insert(0, config)  # `tracerl eval n=2`: no file, only overrides
        config = None
    return config, overrides


def _run_recipe(args: argparse.Namespace, schema, runner) -> int:
    """Shared by `sft` and `rl`: YAML + overrides -> typed config -> run -> summary."""
    from tracerl.config import load_config

    path, overrides = _overrides_and_config(args)
    summary = runner(load_config(schema, path, overrides), progress=_progress_mode(args))
    if _rank() != 0:  # rank 0 reports for the run
        return 0
    if args.json:
        _emit_json(summary)
    else:
        for k, v in summary.items():
            print(f"{k:22s} {v}")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from tracerl.recipes.sft import SFTConfig, run_sft

    return _run_recipe(args, SFTConfig, run_sft)


def cmd_rl(args: argparse.Namespace) -> int:
    from tracerl.recipes.rl import run_rl
    from tracerl.rl import RLConfig

    return _run_recipe(args, RLConfig, run_rl)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from tracerl.recipes.quickstart import format_table, load_quickstart_config, run_quickstart

    path, overrides = _overrides_and_config(args)
    if args.out:
        overrides.append(f"output_dir={args.out}")
    config = load_quickstart_config(path, overrides)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    summary = run_quickstart(config, progress=_progress_mode(args), log=log)
    print(format_table(summary), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        _emit_json(summary)
    return 0


CONFIG_COMMANDS = ("eval", "sft", "rl", "quickstart")
NEED_CONFIG = ("eval", "sft", "rl")  # quickstart runs on its embedded recipe


def default_config(command: str):
    """The config a command runs on when a key is not given: its schema's defaults (``rl``: with a
    ``policy.options`` section for every registered algorithm), ``quickstart``: the recipe's."""
    if command == "eval":
        from tracerl.eval import EvalConfig

        return EvalConfig()
    if command == "sft":
        from tracerl.recipes.sft import SFTConfig

        return SFTConfig()
    if command == "rl":
        from tracerl.rl import RLConfig
        from tracerl.rl.algorithms import algorithm_class, algorithm_names

        config = RLConfig()
        config.policy.options = {name: algorithm_class(name).Options() for name in algorithm_names()}
        return config
    if command == "quickstart":
        from tracerl.recipes.quickstart import load_quickstart_config

        return load_quickstart_config()
    raise TracerlError(f"config: unknown command {command!r}; valid: {', '.join(CONFIG_COMMANDS)}")


def _config_keys_epilog(command: str) -> str:
    """The `--help` listing of every config key of ``command``: key=default, description."""
    from tracerl.config import config_entries, format_value

    rows = [(f"{key}={format_value(value)}", description) for key, value, description in
            config_entries(default_config(command))]
    width = min(44, max(len(left) for left, _ in rows))
    lines = [f"  {left:<{width}}  {description}".rstrip() for left, description in rows]
    source = "the recipe's values" if command == "quickstart" else "defaults"
    return (f"config keys ({source}; set them in the YAML file or as key=value; "
            f"`tracerl config {command}` prints them as YAML):\n" + "\n".join(lines))


def cmd_config(args: argparse.Namespace) -> int:
    from tracerl.config import default_yaml

    what = "the recipe (tracerl/recipes/quickstart.yaml)" if args.what == "quickstart" else "every key's default"
    print(f"# `tracerl {args.what}` config: {what}.  Run: tracerl {args.what} FILE [key=value ...]")
    if args.what == "rl":
        print("# policy.options: one section per RL algorithm; the run uses policy.method's.")
    sys.stdout.write(default_yaml(default_config(args.what)))
    return 0


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose slow parts wait until they are needed: ``setup(parser)`` adds
    options when this (sub)parser first parses or shows its usage (generate's sampling options
    import the generation package, which imports torch), and an ``epilog`` given as a function
    is called only when the help is shown (the config-key listings import the recipes)."""

    def __init__(self, *args, setup=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._setup = setup

    def _ready(self) -> None:
        setup, self._setup = self._setup, None
        if setup is not None:
            setup(self)

    def parse_known_args(self, args=None, namespace=None):
        self._ready()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._ready()
        return super().format_usage()

    def format_help(self) -> str:
        self._ready()
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def _add_config_command(sub, name: str, help_text: str, example_config: str, example_override: str, func):
    """A subcommand taking `CONFIG [key=value ...] [--no-progress] [--json]` (eval, sft, rl,
    quickstart); its --help lists every config key with its default and description."""
    p = sub.add_parser(name, help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=lambda: _config_keys_epilog(name))
    p.add_argument("config", nargs="?", default=None, help=f"YAML config (see {example_config})")
    p.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example_override}")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=func, parser=p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tracerl",
        description="Build, post-train (SFT, TraceRL) and serve diffusion language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="generate from a preset or checkpoint folder", setup=_add_sampling_options)
    p.add_argument("--model", default="tiny-block", help="preset (tiny-block, tiny-full, tiny-shifted) or folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--device", default="cpu")
    p.add_argument("--logprobs", action="store_true", help="also report per-token log-probs and confidences")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("trace", help="write an HTML page replaying one generation's unmasking order",
                       setup=_add_sampling_options)
    p.add_argument("--model", default="tiny-block")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--html", required=True, help="output HTML file")
    p.add_argument("--answer", default=None, help="the gold answer: the page marks the response (math verifier) "
                   "correct or incorrect and shows both answers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("bench", help="benchmarks (generate, train, engine)")
    p.add_argument("what", help="benchmark name: generate, train, engine")
    p.add_argument("--model", default="tiny-block")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for smoke tests")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (completions, chat, "
                       "streaming with the decoding trace)", setup=_add_serve_options)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("score", help="score existing generations (a 'response' field + task fields)")
    p.add_argument("--task", required=True, choices=["math", "code"])
    p.add_argument("--input", required=True, help="JSONL with a 'response' field and the task fields")
    p.add_argument("--output", required=True, help="JSONL: every input row, in order, with the scores added")
    p.add_argument("--answer-field", default=None,
                   help="math: the gold answer's field (default: ground_truth_answer, else answer as in "
                        "tracerl eval's samples)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="keep going past malformed rows (they are written back with an 'error' field)")
    p.add_argument("--workers", type=int, default=2, help="code: programs run in parallel")
    p.add_argument("--reward", nargs="+", default=["task"], metavar="FUNC",
                   help="reward functions: task (the task's verifier), path/to/file.py:name or module:name")
    p.add_argument("--reward-weights", nargs="+", type=float, default=None, metavar="W", help="one per --reward")
    p.add_argument("--correct-at", type=float, default=1.0,
                   help="without 'task' among --reward: a row is correct when its reward >= this")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_score)

    _add_config_command(sub, "eval", "generate for a task and report accuracy, pass@k, length, NFE, speed",
                        "configs/eval-tiny.yaml", "sampling.steps=2 n=4", cmd_eval)
    _add_config_command(sub, "sft", "supervised fine-tuning (block, trace, random-masking, semi-AR, AR)",
                        "configs/sft-tiny.yaml", "max_steps=10 optim.lr=1e-4", cmd_sft)
    _add_config_command(sub, "rl", "reinforcement learning: TraceRL (+ value model), random-masking, coupled",
                        "configs/rl-tiny.yaml", "policy.method=coupled", cmd_rl)

    p = _add_config_command(sub, "quickstart", "the whole pipeline on CPU: SFT -> eval -> TraceRL + value model "
                            "-> eval, plots, trace page", "tracerl/recipes/quickstart.yaml", "rl.max_steps=50",
                            cmd_quickstart)
    p.add_argument("--out", default=None, help="output folder (default: runs/quickstart)")

    p = sub.add_parser("config", help="print a command's full config (every key, its default, what it does) as YAML")
    p.add_argument("what", metavar="CMD", choices=CONFIG_COMMANDS, help=f"one of: {', '.join(CONFIG_COMMANDS)}")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("info", help="describe a model: family, mask token, block size, size")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="load any supported checkpoint and save it as a tracerl checkpoint")
    p.add_argument("source")
    p.add_argument("output")
    p.add_argument("--family", default=None, help="override: block, full, shifted")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    if args.command in NEED_CONFIG and args.config is None and not args.overrides:
        # A run on nothing but built-in defaults is never what was meant: say how to get a config.
        args.parser.error(f"give a config file or key=value overrides (`tracerl config {args.command}` "
                          "prints the defaults)")
    _quiet_libraries()
    warnings_handler = _warnings_to_stderr(args.command)
    try:
        code = args.func(args)
    except TracerlError as e:
        rank = f"[rank {_rank()}] " if _torchrun_worker() else ""
        print(f"{rank}tracerl {args.command}: error: {e}", file=sys.stderr)
        code = 2
    finally:
        logging.getLogger("tracerl").removeHandler(warnings_handler)
    if _torchrun_worker():
        # gloo can abort a worker at interpreter exit after a clean run (DESIGN.md, environment
        # facts): the process group is already closed, so leave without the interpreter teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _torchrun_worker() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


if __name__ == "__main__":
    sys.exit(main())
