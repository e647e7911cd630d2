"""``tracerl eval``: generate for a task, score, and report accuracy, pass@k, length, NFE, speed."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from tracerl.data.jsonl import write_jsonl
from tracerl.data.tasks import Problem, TaskConfig, load_problems
from tracerl.data.templates import instruction, render_prompt
from tracerl.errors import ConfigError
from tracerl.generation import GenerationStats, SamplingConfig, generate
from tracerl.rewards import score_batch


@dataclass
class EvalConfig:
    model: str = "tiny-block"
    task: TaskConfig = field(default_factory=TaskConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    n: int = 1  # samples per problem
    k: list[int] = field(default_factory=lambda: [1])  # pass@k values to report (k <= n)
    batch_size: int = 16  # prompts per generate() call
    output_dir: str = "runs/eval"
    device: str = "cpu"
    seed: int = 0
    code_workers: int = 2

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n: must be >= 1, got {self.n}")
        bad = [k for k in self.k if not 1 <= k <= self.n]
        if bad:
            raise ConfigError(f"k: pass@{bad[0]} needs 1 <= k <= n = {self.n}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def prompt_ids(model, problem: Problem, task: TaskConfig) -> list[int]:
    user, assistant_prefix = instruction(task.template, "code" if problem.kind == "code" else "math",
                                         problem.question, problem.code_style)
    if problem.kind == "code" and problem.prefix and task.template != "raw":
        assistant_prefix += problem.prefix  # the model continues the starter code
    return render_prompt(model.tokenizer, user, assistant_prefix, chat=task.chat)


def evaluate(model, problems: list[Problem], config: EvalConfig, *, progress=None) -> tuple[dict, list[dict]]:
    """Generate ``n`` samples per problem, score them; returns (summary, sample records)."""
    sampling = config.sampling
    prompts = [prompt_ids(model, p, config.task) for p in problems]
    jobs = [(i, s) for i in range(len(problems)) for s in range(config.n)]
    stats = GenerationStats()
    samples: list[dict] = []
    t0 = time.perf_counter()
    for start in range(0, len(jobs), config.batch_size):
        chunk = jobs[start : start + config.batch_size]
        batch_config = SamplingConfig(**{**sampling.to_dict(), "seed": (sampling.seed or config.seed) + start})
        gens = generate(model, [prompts[i] for i, _ in chunk], batch_config, stats=stats)
        # Rewards read the text without special tokens (eos, im_end, padding).
        texts = [model.tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in gens]
        scores = score_batch([problems[i] for i, _ in chunk], texts, workers=config.code_workers)
        for (i, s), g, sc in zip(chunk, gens, scores):
            samples.append({
                "problem_id": problems[i].id, "sample": s, "question": problems[i].question,
                "answer": problems[i].answer, "response": g.text, "token_ids": g.response_ids,
                "step_map": g.step_map, "nfe": g.nfe, "finish_reason": g.finish_reason,
                "reward": sc.reward, "correct": sc.correct, "extracted_answer": sc.extracted_answer,
                **({"details": sc.details} if sc.details else {}),
            })
        if progress is not None:
            progress(len(chunk))
    wall = time.perf_counter() - t0

    by_problem: dict[str, list[bool]] = {}
    for r in samples:
        by_problem.setdefault(r["problem_id"], []).append(bool(r["correct"]))
    tokens = sum(len(r["token_ids"]) for r in samples)
    summary = {
        "model": config.model,
        "task": f"{config.task.source}:{config.task.name}",
        "problems": len(problems),
        "samples": len(samples),
        "accuracy": sum(r["correct"] for r in samples) / len(samples),
        "mean_reward": sum(r["reward"] for r in samples) / len(samples),
        **{f"pass@{k}": sum(pass_at_k(len(v), sum(v), k) for v in by_problem.values()) / len(by_problem)
           for k in config.k},
        "mean_response_length": tokens / len(samples),
        "nfe_per_token": sum(r["nfe"] for r in samples) / max(1, tokens),
        "tokens_per_s": tokens / max(stats.seconds, 1e-9),
        "seconds": wall,
        "sampling": {k: v for k, v in sampling.to_dict().items() if v is not None},
    }
    return summary, samples


def run_eval(config: EvalConfig, *, show_progress: bool = True) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tracerl.models import load_model

    model = load_model(config.model, device=config.device)
    problems = load_problems(config.task)
    out = Path(config.output_dir)
    with Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), disable=not show_progress, transient=False) as bar:
        task_id = bar.add_task("eval", total=len(problems) * config.n)
        summary, samples = evaluate(model, problems, config, progress=lambda n: bar.advance(task_id, n))
    write_jsonl(out / "samples.jsonl", samples)
    summary["samples_file"] = str(out / "samples.jsonl")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
