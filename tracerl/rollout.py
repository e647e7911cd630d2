"""One rollout path: problems -> prompts -> generations -> decoded text -> scores.

Evaluation, the RL loop and the quickstart's trace page all sample through ``rollout``.  It
decodes on the continuous-batching engine (``engine="engine"``, the default: at most
``batch_size`` requests in flight, a finished request's slot refilled at the next block step) or
on the static sampler (``engine="static"``: ``generate`` in batches of ``batch_size``, each batch
decoding until its longest response ends).  Both give every request the same output (the
engine's contract); the engine is faster when response lengths vary.  Models or settings the
engine does not serve (``engine_serves``) use the static sampler.  The engine runs the model it
is given, the trainer's in-memory weights, so an update is visible to the next rollout.
It is a module of its own below ``eval/`` and ``rl/`` (DESIGN.md first placed it in ``rl/``) so
that evaluation, which RL uses for its held-out curve, does not depend on RL.

Seed rule.  A rollout has a *seed key*, a tuple of non-negative ints (eval: ``(seed,)``; an RL
step: ``(seed, step)``).  Sample ``s`` of problem ``i`` (``i`` = its index in the ``problems`` list
of the call) draws all its randomness from its own generator, seeded with
``derive_seed(*key, i, s)``.  A sample therefore never depends on ``batch_size``, on which other
requests shared its forward passes, or on their order (exactly so wherever the model's forward
gives a row the same numbers at any batch size, as fp32 on CPU does; bf16 kernels on a GPU may
differ in the last bits between batch shapes).  The base seed of a run is
``sampling.seed`` when set, else the run's ``seed`` (``base_seed``): a sampling seed of 0 is a
seed, not "unset".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tracerl.data.tasks import Problem, TaskConfig
from tracerl.engine import Engine, engine_serves
from tracerl.errors import ConfigError
from tracerl.data.templates import problem_prompt_ids
from tracerl.generation import Generation, GenerationStats, SamplingConfig, derive_seed, generate
from tracerl.rewards import Rewards, Score


@dataclass
class Sample:
    """One response to one problem: the trace, the text the reward read, and its score."""

    problem_index: int  # index of the problem in the rollout's ``problems`` (+ ``first_index``)
    sample: int  # 0 .. samples_per_problem - 1
    problem: Problem
    generation: Generation
    text: str  # decoded without special tokens: what the reward saw
    score: Score


@dataclass
class RolloutResult:
    samples: list[Sample]  # problem-major: problem 0's samples first, each in sample order
    reward_errors: list[str]  # one line per sample whose reward function raised (scored 0)
    stats: GenerationStats  # generation only (seconds, forwards, tokens)
    reward_seconds: float = 0.0  # time spent scoring


ROLLOUT_ENGINES = ("engine", "static")


def check_engine(name: str, field: str = "engine") -> str:
    if name not in ROLLOUT_ENGINES:
        raise ConfigError(f"{field}: unknown {name!r}; valid: {', '.join(ROLLOUT_ENGINES)}")
    return name


def generate_requests(model, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int], *,
                      engine: str, batch_size: int, stats: GenerationStats,
                      progress: Callable[[int], None] | None = None) -> list[Generation]:
    """One ``Generation`` per prompt, on the engine or the static sampler (see the module
    docstring); ``progress(n)`` as n more are generated."""
    if check_engine(engine) == "engine" and engine_serves(model, sampling) is None:
        eng = Engine(model, max_running=batch_size)
        out = eng.generate(prompts, sampling, seeds=seeds, progress=progress)
        stats.seconds += eng.stats.seconds
        stats.forward_seconds += eng.stats.forward_seconds
        stats.forwards += eng.stats.model_calls
        stats.new_tokens += eng.stats.new_tokens
        return out
    out = []
    for start in range(0, len(prompts), batch_size):
        out += generate(model, prompts[start:start + batch_size], sampling,
                        seeds=seeds[start:start + batch_size], stats=stats)
        if progress is not None:
            progress(len(out) - start)
    return out


def base_seed(sampling: SamplingConfig, run_seed: int) -> int:
    return sampling.seed if sampling.seed is not None else run_seed


def prompts_for(tokenizer, problems: Sequence[Problem], task: TaskConfig) -> list[list[int]]:
    return [problem_prompt_ids(tokenizer, p, task) for p in problems]


def rollout(
    model,
    problems: Sequence[Problem],
    prompts: Sequence[list[int]],
    sampling: SamplingConfig,
    *,
    seed_key: tuple[int, ...],
    samples_per_problem: int = 1,
    batch_size: int = 64,
    engine: str = "engine",
    reward_workers: int = 2,
    fail_on_reward_error: bool = True,
    progress: Callable[[int], None] | None = None,
    first_index: int = 0,
    rewards: Rewards | None = None,
) -> RolloutResult:
    """``samples_per_problem`` responses per problem, scored; see the module docstring for seeds.

    ``prompts[i]`` are problem i's prompt ids (``prompts_for``; computed once by callers that
    sample the same problems every step).  ``engine``: "engine" (``batch_size`` requests in
    flight) or "static" (``generate`` in batches of ``batch_size``); the samples are the same.  A reward function that raises ends the rollout with
    ``fail_on_reward_error``; otherwise that sample scores 0 and is reported in
    ``reward_errors``.  ``first_index``: the index of ``problems[0]`` among the problems of the
    whole step (a rank's share of them): seeds and ``problem_index`` count from it, so a sample
    does not depend on how the step is split over ranks.  ``rewards``: the reward functions
    (rewards/functions.py; default: the task's own verifier)."""
    if len(prompts) != len(problems):
        raise ValueError(f"{len(problems)} problems but {len(prompts)} prompts")
    jobs = [(i, s) for i in range(len(problems)) for s in range(samples_per_problem)]
    stats = GenerationStats()
    samples: list[Sample] = []
    errors: list[str] = []
    reward_seconds = 0.0
    rewards = rewards or Rewards()
    generations = generate_requests(model, [prompts[i] for i, _ in jobs], sampling,
                                    [derive_seed(*seed_key, first_index + i, s) for i, s in jobs],
                                    engine=engine, batch_size=batch_size, stats=stats, progress=progress)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        gens = generations[start : start + batch_size]
        # Rewards read the text without special tokens (eos, im_end, padding).
        texts = [model.tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in gens]
        t0 = time.perf_counter()
        scores, chunk_errors = safe_scores(rewards, [problems[i] for i, _ in chunk], texts,
                                           [g.response_ids for g in gens], reward_workers, fail_on_reward_error)
        reward_seconds += time.perf_counter() - t0
        errors += chunk_errors
        samples += [Sample(first_index + i, s, problems[i], g, t, sc)
                    for (i, s), g, t, sc in zip(chunk, gens, texts, scores)]
    return RolloutResult(samples, errors, stats, reward_seconds)


def safe_scores(rewards: Rewards, problems: Sequence[Problem], texts: Sequence[str], ids: Sequence[Sequence[int]],
                workers: int, fail: bool) -> tuple[list[Score], list[str]]:
    """Score; with ``fail`` False a reward function that raises (or returns no valid reward) gives
    0 for that sample and a report naming it (problem id, function, exception, start of the response)."""
    errors: list[str] | None = None if fail else []
    return rewards.score(problems, texts, ids, workers=workers, errors=errors), errors or []
