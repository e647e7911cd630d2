"""Curricula: a schedule by RL step over the task's difficulty parameters and the response cap.

    curriculum:
      - {start: 1,   task_params: {max_terms: 2}, max_new_tokens: 256}
      - {start: 200, task_params: {max_terms: 4}, max_new_tokens: 1024}
      - {start: 400, max_new_tokens: 4096}      # keys a stage leaves out keep the previous stage's value

Stage k holds from its ``start`` step (1-based, the step being taken) until the next stage
starts; before the first stage the run's own ``task`` / ``rollout.sampling`` apply.  ``task_params``
are merged over ``task.params`` (reasoning-gym generator options: number of terms, digits, grid
size, ...), ``max_new_tokens`` replaces ``rollout.sampling.max_new_tokens`` (TraDo-Thinking's
long-reasoning recipe grows the cap in stages).  The stage is a function of the step alone, so a
resumed run is on the same stage with the same problems as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tracerl.errors import ConfigError


@dataclass
class CurriculumStage:
    start: int  # the first RL step (1-based) of this stage
    task_params: dict = field(default_factory=dict)  # merged over task.params (gym generator difficulty options)
    max_new_tokens: int | None = None  # the rollout's response cap from this stage on (null: as before)


def check_curriculum(stages: list[CurriculumStage], task_source: str) -> None:
    starts = [s.start for s in stages]
    for i, s in enumerate(stages):
        if s.start < 1:
            raise ConfigError(f"curriculum[{i}].start: steps count from 1, got {s.start}")
        if i and s.start <= starts[i - 1]:
            raise ConfigError(f"curriculum[{i}].start: stages must start at increasing steps, got {starts}")
        if s.max_new_tokens is not None and s.max_new_tokens < 1:
            raise ConfigError(f"curriculum[{i}].max_new_tokens: must be >= 1, got {s.max_new_tokens}")
        if s.task_params and task_source != "gym":
            raise ConfigError(f"curriculum[{i}].task_params: difficulty parameters are reasoning-gym generator "
                              f"options; task.source is {task_source!r}")


def stage_at(stages: list[CurriculumStage], step: int) -> int:
    """Index of the stage that holds at ``step`` (1-based), -1 before the first."""
    index = -1
    for i, s in enumerate(stages):
        if s.start <= step:
            index = i
    return index


def config_at(config, step: int):
    """``config`` (an RLConfig) with the curriculum applied up to and including ``step``'s stage."""
    stages = config.curriculum
    index = stage_at(stages, step)
    if index < 0:
        return config
    params, cap = dict(config.task.params), config.rollout.sampling.max_new_tokens
    for s in stages[: index + 1]:
        params.update(s.task_params)
        cap = s.max_new_tokens if s.max_new_tokens is not None else cap
    rollout = replace(config.rollout, sampling=replace(config.rollout.sampling, max_new_tokens=cap))
    return replace(config, task=replace(config.task, params=params), rollout=rollout)
