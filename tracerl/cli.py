"""The ``tracerl`` command.

Commands that report results accept ``--json``: the last line of stdout is then one JSON object;
progress and logs go to stderr.  User errors (bad options, bad checkpoints) exit with status 2 and
a one-line message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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


def _emit_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    from tracerl.generation.config import FULL_CACHE_MODES, STRATEGIES

    p.add_argument("--block-size", type=int, default=None, help="tokens per block (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per block (default: block size)")
    p.add_argument("--strategy", default="static", help=f"unmasking rule: {', '.join(STRATEGIES)}")
    p.add_argument("--threshold", type=float, default=0.9, help="confidence threshold of 'dynamic'")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="disable the KV cache (exact reference)")
    p.add_argument("--full-cache", default="none", help=f"full attention cache: {', '.join(FULL_CACHE_MODES)}")


def _sampling_config(args: argparse.Namespace, return_logprobs: bool = False):
    from tracerl.generation.config import SamplingConfig

    return SamplingConfig(
        max_new_tokens=args.max_new_tokens, block_size=args.block_size, steps=args.steps,
        strategy=args.strategy, threshold=args.threshold, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache,
        full_cache=args.full_cache, seed=args.seed, return_logprobs=return_logprobs,
    )


def _encode_prompt(model, text: str, chat: bool) -> list[int]:
    if text == "":
        raise TracerlError("--prompt: empty prompt")
    tok = model.tokenizer
    if chat:
        if not tok.chat_template:
            raise TracerlError("--chat: this model's tokenizer has no chat template")
        out = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
    return tok.encode(text, add_special_tokens=False)


def _generate_one(args: argparse.Namespace, return_logprobs: bool = False):
    from tracerl.generation import generate
    from tracerl.models import load_model

    model = load_model(args.model, device=args.device)
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
    from tracerl.trace_view import write_trace_html

    model, gen = _generate_one(args, return_logprobs=True)
    path = write_trace_html(args.html, model.tokenizer, [gen], title=args.prompt[:80])
    if args.json:
        _emit_json({"html": str(path), "tokens": len(gen.response_ids), "nfe": gen.nfe})
    else:
        print(path)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "generate":
        from tracerl.bench import bench_generate, format_generate_table

        result = bench_generate(model_name=args.model, device=args.device, quick=args.quick)
        print(format_generate_table(result), file=sys.stderr if args.json else sys.stdout)
        if args.json:
            _emit_json(result)
        return 0
    if args.what == "train":
        from tracerl.bench_train import bench_train, format_train_table

        result = bench_train(quick=args.quick)
        print(format_train_table(result), file=sys.stderr if args.json else sys.stdout)
        if args.json:
            _emit_json(result)
        return 0
    raise TracerlError(f"bench: unknown benchmark {args.what!r}; valid: generate, train")


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
    }
    if args.json:
        _emit_json(info)
    else:
        for k, v in info.items():
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


def cmd_score(args: argparse.Namespace) -> int:
    from tracerl.scoring import score_file

    summary = score_file(args.task, args.input, args.output, skip_bad_rows=args.skip_bad_rows,
                         workers=args.workers, answer_field=args.answer_field)
    if args.json:
        _emit_json(summary)
    else:
        print(f"scored {summary['scored']} rows ({summary['skipped']} skipped): accuracy "
              f"{summary['accuracy']:.4f}, mean reward {summary['mean_reward']:.4f} -> {args.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tracerl.config import load_config
    from tracerl.evaluation import EvalConfig, run_eval

    path, overrides = _overrides_and_config(args)
    config = load_config(EvalConfig, path, overrides)
    summary = run_eval(config, show_progress=not args.no_progress)
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
    summary = runner(load_config(schema, path, overrides), progress=not args.no_progress)
    if args.json:
        _emit_json(summary)
    else:
        for k, v in summary.items():
            print(f"{k:22s} {v}")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from tracerl.train.sft import SFTConfig, run_sft

    return _run_recipe(args, SFTConfig, run_sft)


def cmd_rl(args: argparse.Namespace) -> int:
    from tracerl.rl import RLConfig, run_rl

    return _run_recipe(args, RLConfig, run_rl)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from tracerl.quickstart import format_table, load_quickstart_config, run_quickstart

    path, overrides = _overrides_and_config(args)
    if args.out:
        overrides.append(f"output_dir={args.out}")
    config = load_quickstart_config(path, overrides)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    summary = run_quickstart(config, progress=not args.no_progress, log=log)
    print(format_table(summary), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        _emit_json(summary)
    return 0


def _add_config_command(sub, name: str, help_text: str, example_config: str, example_override: str, func):
    """A subcommand taking `CONFIG [key=value ...] [--no-progress] [--json]` (eval, sft, rl)."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument("config", nargs="?", default=None, help=f"YAML config (see {example_config})")
    p.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example_override}")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracerl",
        description="Build, post-train (SFT, TraceRL) and serve diffusion language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="generate from a preset or checkpoint folder")
    p.add_argument("--model", default="tiny-block", help="preset (tiny-block, tiny-full, tiny-shifted) or folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--device", default="cpu")
    p.add_argument("--logprobs", action="store_true", help="also report per-token log-probs and confidences")
    p.add_argument("--json", action="store_true")
    _add_sampling_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("trace", help="write an HTML page replaying one generation's unmasking order")
    p.add_argument("--model", default="tiny-block")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--html", required=True, help="output HTML file")
    p.add_argument("--json", action="store_true")
    _add_sampling_options(p)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("bench", help="benchmarks (generate, train)")
    p.add_argument("what", help="benchmark name: generate, train")
    p.add_argument("--model", default="tiny-block")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for smoke tests")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("score", help="score existing generations (a 'response' field + task fields)")
    p.add_argument("--task", required=True, choices=["math", "code"])
    p.add_argument("--input", required=True, help="JSONL with a 'response' field and the task fields")
    p.add_argument("--output", required=True, help="JSONL: every input row, in order, with the scores added")
    p.add_argument("--answer-field", default="ground_truth_answer", help="math: the gold answer's field")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="keep going past malformed rows (they are written back with an 'error' field)")
    p.add_argument("--workers", type=int, default=2, help="code: programs run in parallel")
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
    _quiet_libraries()
    try:
        return args.func(args)
    except TracerlError as e:
        print(f"tracerl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
