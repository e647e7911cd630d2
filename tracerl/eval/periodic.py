"""Evaluation during training (SFT validation, RL held-out accuracy)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tracerl.data.tasks import TaskConfig, load_problems
from tracerl.eval.evaluate import EvalConfig, evaluate
from tracerl.generation import SamplingConfig
from tracerl.rollout import check_engine


@dataclass
class PeriodicEvalConfig:
    every: int = 0  # evaluate every N steps (0: never during training)
    task: TaskConfig = field(default_factory=lambda: TaskConfig(split="eval", size=32))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    n: int = 1  # samples per problem
    batch_size: int = 32  # requests in flight (engine) / per generate() call (static)
    engine: str = "engine"  # engine (continuous batching) | static (generate() in batches); same samples
    stop_at: float | None = None  # SFT: stop once the eval accuracy reaches this (hand RL a partly trained model)

    def __post_init__(self) -> None:
        check_engine(self.engine)


def periodic_eval(model, config: PeriodicEvalConfig, seed: int, *, progress=None) -> dict:
    """Accuracy, NFE per token, mean response length and problem count of ``model`` on the task
    (``progress(n)`` as n more samples finish)."""
    model.eval()
    problems = load_problems(config.task)
    eval_config = EvalConfig(task=config.task, sampling=config.sampling, n=config.n, k=[1],
                             batch_size=config.batch_size, engine=config.engine, seed=seed)
    summary, _ = evaluate(model, problems, eval_config, progress=progress)
    return {"accuracy": summary["accuracy"], "nfe_per_token": summary["nfe_per_token"],
            "response_length": summary["mean_response_length"], "problems": summary["problems"]}
