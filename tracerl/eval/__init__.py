"""Evaluation: accuracy, unbiased pass@k, length, NFE and speed; periodic evaluation in training."""

from tracerl.eval.evaluate import EvalConfig, evaluate, pass_at_k
from tracerl.eval.periodic import PeriodicEvalConfig, periodic_eval

__all__ = ["EvalConfig", "PeriodicEvalConfig", "evaluate", "pass_at_k", "periodic_eval"]
