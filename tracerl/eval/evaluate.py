"""Evaluation: sample ``n`` responses per problem, score them, report accuracy, pass@k, length,
NFE and speed."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from tracerl.data.tasks import Problem, TaskConfig
from tracerl.errors import ConfigError
from tracerl.generation import SamplingConfig
from tracerl.generation.seeds import check_seed_value
from tracerl.rewards import RewardConfig, Rewards
from tracerl.rollout import base_seed, check_engine, prompts_for, rollout


@dataclass
class EvalConfig:
    model: str = "tiny-block"  # preset name or checkpoint folder
    task: TaskConfig = field(default_factory=TaskConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)  # reward functions and weights (rewards/functions.py)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    n: int = 1  # samples per problem
    k: list[int] = field(default_factory=lambda: [1])  # pass@k values to report (k <= n)
    batch_size: int = 16  # requests in flight (engine) / per generate() call (static); never changes a sample
    engine: str = "engine"  # engine (continuous batching) | static (generate() in batches); same samples
    output_dir: str = "runs/eval"  # samples.jsonl (with step maps) and summary.json
    device: str = "cpu"  # cpu, cuda, cuda:N, mps
    seed: int = 0  # base seed when sampling.seed is unset
    code_workers: int = 2  # code rewards: programs run in parallel

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n: must be >= 1, got {self.n}")
        bad = [k for k in self.k if not 1 <= k <= self.n]
        if bad:
            raise ConfigError(f"k: pass@{bad[0]} needs 1 <= k <= n = {self.n}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        self.seed = check_seed_value(self.seed, "seed")
        check_engine(self.engine)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(model, problems: list[Problem], config: EvalConfig, *, progress=None) -> tuple[dict, list[dict]]:
    """Generate ``n`` samples per problem, score them; returns (summary, sample records)."""
    sampling = config.sampling
    t0 = time.perf_counter()
    result = rollout(model, problems, prompts_for(model.tokenizer, problems, config.task), sampling,
                     seed_key=(base_seed(sampling, config.seed),), samples_per_problem=config.n,
                     batch_size=config.batch_size, engine=config.engine, reward_workers=config.code_workers,
                     progress=progress, rewards=Rewards(config.reward))
    wall = time.perf_counter() - t0
    samples = []
    for x in result.samples:
        g, sc = x.generation, x.score
        samples.append({
            "problem_id": x.problem.id, "sample": x.sample, "question": x.problem.question,
            "answer": x.problem.answer, "response": g.text, "token_ids": g.response_ids,
            "step_map": g.step_map, "nfe": g.nfe, "finish_reason": g.finish_reason,
            "reward": sc.reward, "correct": sc.correct, "extracted_answer": sc.extracted_answer,
            **({"details": sc.details} if sc.details else {}),
            **({"token_rewards": sc.token_rewards} if sc.token_rewards is not None else {}),
        })

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
        "tokens_per_s": tokens / max(result.stats.seconds, 1e-9),
        "seconds": wall,
        "sampling": {k: v for k, v in sampling.to_dict().items() if v is not None},
    }
    return summary, samples
