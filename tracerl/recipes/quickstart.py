"""``tracerl quickstart``: the whole pipeline on CPU in minutes.

tiny-block preset -> block SFT on an embedded reasoning-gym task -> held-out evaluation ->
TraceRL with the diffusion value model -> held-out evaluation, then plots, a trace-viewer page of
solved held-out problems and ``summary.json``.  The recipe (task, sizes, learning rates) lives in
``tracerl/recipes/quickstart.yaml``; every key can be overridden (``rl.max_steps=50``).

Output folder layout::

    DIR/sft/        SFT run (checkpoints/, metrics.jsonl, config.json, summary.json)
    DIR/rl/         RL run (checkpoints/ incl. value-model folders, metrics.jsonl, ...)
    DIR/plots/      reward.png, heldout_accuracy.png, response_length.png, nfe_per_token.png
    DIR/traces.html solved held-out problems, replayable step by step
    DIR/summary.json
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tracerl.errors import ConfigError
from tracerl.eval import PeriodicEvalConfig, periodic_eval
from tracerl.files import write_json
from tracerl.generation.seeds import check_seed_value
from tracerl.recipes.rl import check_rl_config, run_rl
from tracerl.recipes.sft import SFTConfig, run_sft
from tracerl.rl.config import RLConfig

RECIPE = Path(__file__).parent / "quickstart.yaml"


@dataclass
class QuickstartConfig:
    output_dir: str = "runs/quickstart"  # sft/, rl/, plots/, traces.html, summary.json
    seed: int = 0  # one seed for SFT, RL and the evaluations
    traces: int = 4  # solved held-out problems on the trace page
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


def run_quickstart(config: QuickstartConfig, *, progress: bool = True, log=print) -> dict:
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
    before = periodic_eval(sft_model, config.heldout, config.seed)
    del sft_model
    log(f"      accuracy {before['accuracy']:.3f}, NFE/token {before['nfe_per_token']:.2f}")

    value = " + value model" if rl_config.value.enabled else ""
    log(f"[3/4] RL: {rl_config.policy.method}{value}, {rl_config.max_steps} steps x "
        f"{rl_config.rollout.num_prompts} prompts x {rl_config.rollout.group_size} samples")
    rl_summary = run_rl(rl_config, progress=progress)

    log("[4/4] held-out evaluation of the RL checkpoint, plots, traces")
    rl_model = load_model(rl_summary["final_checkpoint"], device=rl_config.device)
    after = periodic_eval(rl_model, config.heldout, config.seed)
    plots = write_plots(out / "plots", Path(rl_config.output_dir) / "metrics.jsonl", before)
    traces = write_solved_traces(out / "traces.html", rl_model, config.heldout, config.traces, config.seed)

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


def write_plots(folder: Path, metrics_file: Path, before: dict) -> list[Path]:
    from tracerl.report.plots import moving_average, plot_series
    from tracerl.train.metrics import read_metrics

    rows = read_metrics(metrics_file)
    steps = [r["step"] for r in rows]
    reward = [r["reward_mean"] for r in rows]
    evals = [(0, before["accuracy"])] + [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    return [
        plot_series(folder / "reward.png", {"reward (per step)": (steps, reward),
                                            "moving mean (10)": (steps, moving_average(reward, 10))},
                    title="Rollout reward", ylabel="mean reward"),
        plot_series(folder / "heldout_accuracy.png", {"held-out": ([s for s, _ in evals], [a for _, a in evals])},
                    title="Held-out accuracy (step 0 = SFT checkpoint)", ylabel="accuracy"),
        plot_series(folder / "response_length.png", {"tokens": (steps, [r["response_length"] for r in rows])},
                    title="Response length (rollouts)", ylabel="tokens"),
        plot_series(folder / "nfe_per_token.png", {"rollouts": (steps, [r["nfe_per_token"] for r in rows])},
                    title="Forward passes per generated token", ylabel="NFE / token"),
    ]


def write_solved_traces(path: Path, model, heldout: PeriodicEvalConfig, count: int, seed: int = 0) -> Path | None:
    """A trace page of up to ``count`` held-out problems the model solves (greedy)."""
    from tracerl.data.tasks import load_problems
    from tracerl.generation import SamplingConfig
    from tracerl.report.trace_page import write_trace_html
    from tracerl.rollout import base_seed, prompts_for, rollout

    if count <= 0:
        return None
    problems = load_problems(heldout.task)
    sampling = SamplingConfig(**{**heldout.sampling.to_dict(), "return_logprobs": True})
    result = rollout(model, problems, prompts_for(model.tokenizer, problems, heldout.task), sampling,
                     seed_key=(base_seed(sampling, seed),), batch_size=max(1, len(problems)))
    solved = [x for x in result.samples if x.score.correct][:count]
    if not solved:
        return None
    return write_trace_html(path, model.tokenizer, [x.generation for x in solved],
                            title="tracerl quickstart: solved held-out problems",
                            labels=[f"{x.problem.question} -> {x.problem.answer}" for x in solved])


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
