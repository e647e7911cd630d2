"""``tracerl quickstart``: the whole pipeline on CPU in minutes.

tiny-block preset -> block SFT on an embedded reasoning-gym task -> held-out evaluation ->
TraceRL with the diffusion value model -> held-out evaluation, then plots, a trace-viewer page of
held-out problems (solved and not) and ``summary.json``.  The recipe (task, sizes, learning rates) lives in
``tracerl/recipes/quickstart.yaml``; every key can be overridden (``rl.max_steps=50``).

Output folder layout::

    DIR/sft/        SFT run (checkpoints/, metrics.jsonl, config.json, summary.json)
    DIR/rl/         RL run (checkpoints/ incl. value-model folders, metrics.jsonl, ...)
    DIR/plots/      sft.png (loss, validation accuracy), reward.png, heldout_accuracy.png (95 % intervals),
                    kl.png, clip_fraction.png, value_loss.png, and nfe_per_token.png / response_length.png
                    unless constant (static decoding: 1 NFE per token, fixed length)
    DIR/traces.html held-out problems (solved and not) decoded dynamically, replayable step by step
    DIR/summary.json
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tracerl.errors import ConfigError
from tracerl.eval import PeriodicEvalConfig, periodic_eval
from tracerl.files import write_json
from tracerl.generation import SamplingConfig
from tracerl.generation.seeds import check_seed_value
from tracerl.progress import ProgressReporter
from tracerl.recipes.rl import check_rl_config, run_rl
from tracerl.recipes.sft import SFTConfig, run_sft
from tracerl.rl.config import RLConfig

RECIPE = Path(__file__).parent / "quickstart.yaml"


@dataclass
class QuickstartConfig:
    output_dir: str = "runs/quickstart"  # sft/, rl/, plots/, traces.html, summary.json
    seed: int = 0  # one seed for SFT, RL and the evaluations
    traces: int = 4  # held-out problems on the trace page (half solved, half not, where both occur)
    # How the trace page decodes them: dynamic (several tokens per forward where the model is sure).
    trace_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(strategy="dynamic"))
    task: dict = field(default_factory=dict)  # YAML anchor holder (the sections below use it)
    heldout: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)


def load_quickstart_config(path: str | Path | None = None, overrides: list[str] = ()) -> QuickstartConfig:
    from tracerl.config import load_config

    return load_config(QuickstartConfig, path or RECIPE, list(overrides))


def _prepare(config: QuickstartConfig) -> tuple[SFTConfig, RLConfig]:
    """Wire the phases together: one seed, one held-out set (the RL model is the SFT run's final
    checkpoint, known once SFT has stopped)."""
    check_seed_value(config.seed, "seed")
    out = Path(config.output_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output_dir {out} is not empty; choose another --out (a quickstart starts fresh)")
    sft = config.sft
    sft.output_dir, sft.seed, sft.resume = str(out / "sft"), config.seed, False
    sft.save_every = 0
    rl = config.rl
    rl.output_dir, rl.seed, rl.resume = str(out / "rl"), config.seed, False
    rl.eval = replace(config.heldout, every=rl.eval.every)  # RL evaluates on the held-out set
    validation = (sft.eval.task.split,) if sft.eval.every else ()
    check_rl_config(rl)  # a bad RL key fails now, not after minutes of SFT
    if config.heldout.task.split in (rl.task.split, sft.data.task.split, *validation):
        raise ConfigError("heldout.task.split must differ from the training and SFT validation splits "
                          "(held-out means unseen, and never used to pick a checkpoint)")
    return sft, rl


def _heldout_eval(model, config: QuickstartConfig, progress: bool | str) -> dict:
    from tracerl.data.tasks import load_problems

    total = len(load_problems(config.heldout.task)) * config.heldout.n
    with ProgressReporter("held-out", total, unit="sample", progress=progress) as bar:
        result = periodic_eval(model, config.heldout, config.seed, progress=lambda n: bar.update(advance=n))
        bar.update(accuracy=result["accuracy"])
    return result


def run_quickstart(config: QuickstartConfig, *, progress: bool | str = True, log=print) -> dict:
    from tracerl.models import load_model

    t0 = time.perf_counter()
    sft_config, rl_config = _prepare(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", asdict(config))

    stop = f" or until validation accuracy {sft_config.eval.stop_at}" if sft_config.eval.stop_at is not None else ""
    log(f"[1/4] SFT: {sft_config.model}, up to {sft_config.max_steps} steps{stop}, on "
        f"{sft_config.data.task.size} demonstrations of {sft_config.data.task.name}")
    sft_summary = run_sft(sft_config, progress=progress)
    rl_config.model = sft_summary["final_checkpoint"]

    log(f"[2/4] held-out evaluation of the SFT checkpoint (step {sft_summary['steps']})")
    sft_model = load_model(sft_summary["final_checkpoint"], device=rl_config.device)
    before = _heldout_eval(sft_model, config, progress)
    del sft_model
    log(f"      accuracy {before['accuracy']:.3f}, NFE/token {before['nfe_per_token']:.2f}")

    value = " + value model" if rl_config.value.enabled else ""
    log(f"[3/4] RL: {rl_config.policy.method}{value}, {rl_config.max_steps} steps x "
        f"{rl_config.rollout.num_prompts} prompts x {rl_config.rollout.group_size} samples")
    rl_summary = run_rl(rl_config, progress=progress)

    log("[4/4] held-out evaluation of the RL checkpoint, plots, traces")
    rl_model = load_model(rl_summary["final_checkpoint"], device=rl_config.device)
    after = _heldout_eval(rl_model, config, progress)
    plots = write_plots(out / "plots", Path(sft_config.output_dir) / "metrics.jsonl",
                        Path(rl_config.output_dir) / "metrics.jsonl", before, config.heldout.n, log=log)
    traces = write_heldout_traces(out / "traces.html", rl_model, config.heldout, config.trace_sampling, config.traces,
                                  config.seed)

    summary = {
        "task": f"{config.heldout.task.source}:{config.heldout.task.name}",
        "heldout_problems": after["problems"],
        "accuracy_sft": before["accuracy"],
        "accuracy_rl": after["accuracy"],
        "gain_points": 100.0 * (after["accuracy"] - before["accuracy"]),
        "nfe_per_token": after["nfe_per_token"],
        "nfe_per_token_sft": before["nfe_per_token"],
        "response_length": after["response_length"],
        "sft_steps": sft_summary["steps"],
        "rl_steps": rl_summary["steps"],
        "rl_method": rl_config.policy.method,
        "value_model": rl_config.value.enabled,
        "minutes": (time.perf_counter() - t0) / 60.0,
        "sft_checkpoint": sft_summary["final_checkpoint"],
        "rl_checkpoint": rl_summary["final_checkpoint"],
        "metrics": str(Path(rl_config.output_dir) / "metrics.jsonl"),
        "plots": [str(p) for p in plots],
        "traces": str(traces) if traces else None,
    }
    write_json(out / "summary.json", summary)
    return summary


def write_plots(folder: Path, sft_metrics: Path, rl_metrics: Path, before: dict, samples_per_problem: int = 1,
                log=None) -> list[Path]:
    """The pipeline's plots (tracerl/report/plots.py: run_plots); ``before`` is the SFT checkpoint's
    held-out evaluation (step 0 of the held-out curve)."""
    from tracerl.report.plots import run_plots
    from tracerl.train.metrics import read_metrics

    rl_rows = read_metrics(rl_metrics)
    heldout = [(0, before["accuracy"], before["problems"] * samples_per_problem)] + [
        (r["step"], r["eval_accuracy"], r["eval_problems"] * samples_per_problem)
        for r in rl_rows if "eval_accuracy" in r]
    written, dropped = run_plots(folder, sft_rows=read_metrics(sft_metrics), rl_rows=rl_rows, heldout=heldout)
    if dropped and log is not None:
        log(f"      plots: none of {', '.join(dropped)} (constant over the run, or not measured)")
    return written


def write_heldout_traces(path: Path, model, heldout: PeriodicEvalConfig, sampling: SamplingConfig, count: int,
                         seed: int = 0) -> Path | None:
    """A trace page of ``count`` held-out problems decoded with ``sampling`` (the recipe: dynamic
    decoding, where one forward commits every token it is confident of): half solved, half not
    where the model gives both, each with its gold answer, the model's answer and a mark."""
    from tracerl.data.tasks import load_problems
    from tracerl.report.trace_page import write_trace_html
    from tracerl.rollout import base_seed, prompts_for, rollout

    if count <= 0:
        return None
    problems = load_problems(heldout.task)
    sampling = replace(sampling, return_logprobs=True)
    result = rollout(model, problems, prompts_for(model.tokenizer, problems, heldout.task), sampling,
                     seed_key=(base_seed(sampling, seed),), batch_size=max(1, len(problems)))
    solved = [x for x in result.samples if x.score.correct]
    failed = [x for x in result.samples if not x.score.correct]
    take_failed = min(len(failed), max(count // 2, count - len(solved)))
    chosen = solved[:count - take_failed] + failed[:take_failed]
    if not chosen:
        return None
    return write_trace_html(path, model.tokenizer, [x.generation for x in chosen],
                            title="tracerl quickstart: held-out problems after RL",
                            labels=[x.problem.question for x in chosen],
                            outcomes=[{"gold": x.problem.answer, "answer": x.score.extracted_answer,
                                       "correct": bool(x.score.correct)} for x in chosen])


def format_table(summary: dict) -> str:
    rows = [
        ("task", summary["task"]),
        ("held-out problems", str(summary["heldout_problems"])),
        ("accuracy after SFT", f"{summary['accuracy_sft']:.3f}"),
        ("accuracy after RL", f"{summary['accuracy_rl']:.3f}"),
        ("gain", f"{summary['gain_points']:+.1f} points"),
        ("NFE per token", f"{summary['nfe_per_token']:.2f}"),
        ("SFT / RL steps", f"{summary['sft_steps']} / {summary['rl_steps']}"),
        ("wall time", f"{summary['minutes']:.1f} min"),
        ("plots", str(Path(summary["plots"][0]).parent) if summary["plots"] else "-"),
        ("trace page", summary["traces"] or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
