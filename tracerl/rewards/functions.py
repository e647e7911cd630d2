"""Reward functions as plug-ins, combined with weights (``reward:`` in the RL, eval and score configs).

    reward:
      functions: [task, my_rewards.py:brevity]   # "task" = the task's own verifier (math, code, gym)
      weights: [1.0, 0.1]                        # TRL's reward_weights; default 1 each

``judge`` is an LLM judge behind any OpenAI-compatible endpoint (rewards/judge.py, configured in
``reward.judge``).  A user function is ``path/to/file.py:name`` or ``module:name``.  It is called once per response
with keywords::

    def brevity(problem, response, response_ids) -> float | list[float]: ...

``problem`` is the ``Problem`` (``question``, ``answer``, ``id``, and in ``problem.meta["row"]`` every
field of its data row), ``response`` the decoded text (special tokens skipped), ``response_ids``
the generated token ids (through the stop token).  It returns a finite number (an outcome reward),
or a list of one finite number per response token (a *process* reward).  The signature is checked
when the config is built, before any model loads; a function that raises on a sample gives that
sample 0 and a report naming the problem (or stops the run with ``fail_on_reward_error``), as the
built-in verifiers do; a wrong return (NaN, inf, a string, a bool, a list of the wrong length) is
such an error, naming the function, the problem and what came back.  Nothing is coerced.

Combination (``Score``):
  reward         sum over functions of weight x value, a process reward counted as its sum;
  token_rewards  sum over process functions of weight x their list (None without one): the RL
                 loop's value model reads them as per-token rewards in GAE over trace steps
                 (objectives/value.py), upstream's vector-reward option;
  correct        the task verifier's verdict when ``task`` is listed, else ``reward >= correct_at``;
  details        ``{"rewards": {function: its unweighted value (a list: its sum)}, ...}``, a function
                 named by what follows ':' (the RL metrics log their means as ``reward/<name>``).
"""

from __future__ import annotations

import inspect
import math
import numbers
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tracerl.data.tasks import Problem
from tracerl.errors import ConfigError
from tracerl.plugins import load_object
from tracerl.rewards import Score, score_batch
from tracerl.rewards.judge import Judge, JudgeConfig

TASK = "task"  # the task's own verifier (rewards/__init__.py: math, code, gym)
JUDGE = "judge"  # an LLM judge behind an OpenAI-compatible endpoint (rewards/judge.py, reward.judge)
ARGUMENTS = ("problem", "response", "response_ids")


@dataclass
class RewardConfig:
    functions: list[str] = field(default_factory=lambda: [TASK])  # "task" (the task's verifier), "judge" (reward.judge), "file.py:name" or "module:name"
    weights: list[float] | None = None  # one per function (TRL's reward_weights); null = 1 each
    correct_at: float = 1.0  # without "task" among the functions: a response is correct when its reward >= this
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # the "judge" function's endpoint, rubric and parsing

    def __post_init__(self) -> None:
        if not self.functions:
            raise ConfigError("reward.functions: give at least one ('task' is the task's own verifier)")
        if len(set(self.functions)) != len(self.functions):
            raise ConfigError(f"reward.functions: listed twice: {self.functions}")
        if self.weights is not None:
            if len(self.weights) != len(self.functions):
                raise ConfigError(f"reward.weights: {len(self.weights)} weights for {len(self.functions)} functions "
                                  f"({', '.join(self.functions)})")
            for i, w in enumerate(self.weights):
                if not math.isfinite(w):
                    raise ConfigError(f"reward.weights[{i}]: must be finite, got {w}")

    @property
    def is_default(self) -> bool:
        return self.functions == [TASK] and self.weights in (None, [1.0])


class RewardValueError(ValueError):
    """A reward function returned something that is not a reward (names function and problem)."""


def _check_signature(fn: Callable, key: str) -> None:
    if not callable(fn):
        raise ConfigError(f"{key}: {fn!r} is not callable")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: checked by its first call
    try:
        sig.bind(**{a: None for a in ARGUMENTS})
    except TypeError as e:
        raise ConfigError(f"{key}: {getattr(fn, '__name__', fn)}{sig} cannot be called as "
                          f"f(problem=..., response=..., response_ids=...): {e}") from None


@dataclass
class RewardFunction:
    name: str  # as written in reward.functions
    weight: float
    fn: Callable | None  # None: the task's verifier
    label: str = ""  # in metrics and details: the function's name after ':' (the full entry where two clash)


class Rewards:
    """The configured functions, loaded and checked; ``score`` gives one ``Score`` per response."""

    def __init__(self, config: RewardConfig | None = None, key: str = "reward.functions") -> None:
        config = config or RewardConfig()
        weights = config.weights or [1.0] * len(config.functions)
        self.config = config
        self.functions: list[RewardFunction] = []
        for i, (name, weight) in enumerate(zip(config.functions, weights)):
            fn = None
            if name == JUDGE:
                fn = Judge(config.judge)
            elif name != TASK:
                fn = load_object(name, f"{key}[{i}]")
                _check_signature(fn, f"{key}[{i}] ({name})")
            self.functions.append(RewardFunction(name, float(weight), fn, name.rpartition(":")[2]))
        labels = [f.label for f in self.functions]
        for f in self.functions:
            if labels.count(f.label) > 1:
                f.label = f.name
        self.uses_task = any(f.fn is None for f in self.functions)

    @property
    def is_default(self) -> bool:
        return self.config.is_default

    def score(self, problems: Sequence[Problem], texts: Sequence[str], response_ids: Sequence[Sequence[int]], *,
              workers: int = 2, errors: list[str] | None = None) -> list[Score]:
        """One ``Score`` per response.  ``errors=None``: the first sample whose reward fails (a
        function raises or returns no valid reward) raises; a list: that sample scores 0 and a line
        naming it (problem id, the function, exception, start of the response) is appended, the
        others keep their scores."""
        if not len(problems) == len(texts) == len(response_ids):
            raise ValueError(f"{len(problems)} problems, {len(texts)} texts, {len(response_ids)} id lists")
        n = len(problems)
        failed: list[BaseException | None] = [None] * n
        culprit: list[str] = [TASK] * n  # which function failed a sample (the report names it)
        task = self._task_scores(problems, texts, workers, failed, errors is not None) if self.uses_task else None
        values: dict[str, list] = {}
        for f in self.functions:
            if f.fn is None:
                continue
            if hasattr(f.fn, "score_many"):  # batched (the LLM judge: concurrent requests)
                raw = f.fn.score_many(list(problems), list(texts), [list(x) for x in response_ids])
            else:
                raw = []
                for p, t, ids in zip(problems, texts, response_ids):
                    try:
                        raw.append(f.fn(problem=p, response=t, response_ids=list(ids)))
                    except Exception as e:  # noqa: BLE001 (a user's function: any error is that sample's)
                        raw.append(e)
            checked = []
            for i, value in enumerate(raw):
                try:
                    if isinstance(value, BaseException):
                        raise value
                    checked.append(_checked(value, f.name, problems[i], len(response_ids[i])))
                except Exception as e:  # noqa: BLE001
                    if errors is None:
                        raise
                    if failed[i] is None:
                        failed[i], culprit[i] = e, f.label
                    checked.append(None)
            values[f.name] = checked
        out = []
        for i in range(n):
            if failed[i] is not None:
                e = failed[i]
                errors.append(f"problem {problems[i].id}: {culprit[i]}: {type(e).__name__}: {e} "
                              f"(response {texts[i][:80]!r})")
                trace = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=2))
                out.append(Score(0.0, False, None, {"error": trace}))
            elif self.is_default:
                out.append(task[i])
            else:
                out.append(self._combine(problems[i], task[i] if task else None,
                                         {name: v[i] for name, v in values.items()}))
        return out

    @staticmethod
    def _task_scores(problems, texts, workers: int, failed: list, isolate: bool) -> list[Score | None]:
        """The task verifier's scores; with ``isolate`` a batch that raises is scored one by one
        and the samples that raise are marked in ``failed``."""
        try:
            return score_batch(list(problems), list(texts), workers=workers)
        except Exception:
            if not isolate:
                raise
        out: list[Score | None] = []
        for i, (p, t) in enumerate(zip(problems, texts)):
            try:
                out.append(score_batch([p], [t], workers=1)[0])
            except Exception as e:  # noqa: BLE001
                failed[i] = e
                out.append(None)
        return out

    def _combine(self, problem: Problem, task: Score | None, values: dict) -> Score:
        total, tokens, parts = 0.0, None, {}
        for f in self.functions:
            value = task.reward if f.fn is None else values[f.name]
            if isinstance(value, list):
                weighted = [f.weight * v for v in value]
                tokens = weighted if tokens is None else [a + b for a, b in zip(tokens, weighted)]
                parts[f.label] = math.fsum(value)
                total += math.fsum(weighted)
            else:
                parts[f.label] = float(value)
                total += f.weight * float(value)
        correct = task.correct if task is not None else total >= self.config.correct_at
        details = {**(task.details or {}), "rewards": parts} if task is not None else {"rewards": parts}
        return Score(total, bool(correct), task.extracted_answer if task is not None else None, details, tokens)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _checked(value, name: str, problem: Problem, length: int):
    """A finite float, or a list of ``length`` finite floats; anything else is a RewardValueError."""
    where = f"reward function {name} on problem {problem.id}"
    if _is_number(value):
        if not math.isfinite(float(value)):
            raise RewardValueError(f"{where}: returned {float(value)}; a reward must be finite")
        return float(value)
    if isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and not isinstance(value, (str, bytes))):
        items = value.tolist() if hasattr(value, "tolist") else list(value)
        if not isinstance(items, list):  # a 0-d array
            return _checked(items, name, problem, length)
        if len(items) != length:
            raise RewardValueError(f"{where}: returned a per-token list of {len(items)} values for a response of "
                                   f"{length} tokens (one value per response token)")
        for j, v in enumerate(items):
            if not _is_number(v) or not math.isfinite(float(v)):
                raise RewardValueError(f"{where}: per-token reward [{j}] is {v!r}; each must be a finite number")
        return [float(v) for v in items]
    raise RewardValueError(f"{where}: returned {type(value).__name__} {value!r:.60}; a reward is a finite number or "
                           f"a list of one number per response token")
