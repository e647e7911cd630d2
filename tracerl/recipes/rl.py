"""``tracerl rl``: the RL run, one process per rank, one in-memory model.

Validates everything it can before any weights load (config, plugins, algorithm and its
options, task, device), then builds the policy and the models the run trains, resumes or starts
fresh, and runs ``rl_step`` (rl/loop.py, generic over the algorithm) with periodic held-out
evaluation, metrics and checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from tracerl.data.tasks import load_problems
from tracerl.errors import ConfigError
from tracerl.eval import periodic_eval
from tracerl.files import write_json
from tracerl.devices import check_device
from tracerl.objectives import NORMALISATIONS
from tracerl.plugins import load_plugins
from tracerl.progress import ProgressReporter
from tracerl.rewards import Rewards
from tracerl.rl.algorithms import Algorithm, make_algorithm
from tracerl.rl.config import RLConfig
from tracerl.rl.curriculum import check_curriculum, config_at, stage_at
from tracerl.rl.loop import check_value_use, rl_step, setup_models, sync_reference
from tracerl.rollout import prompts_for
from tracerl.train import distributed, lora
from tracerl.train.loop import TrainingRun, check_attention


def check_rl_config(config: RLConfig, model=None) -> Algorithm:
    """Incompatible options fail here, before any work, with the reason; returns the algorithm.
    With ``model``, also the checks that need its attention kind."""
    load_plugins(config.plugins)
    algorithm = make_algorithm(config.policy)
    Rewards(config.reward)  # a missing file or function, a wrong signature: now, before any work
    p = config.policy
    if p.normalisation not in NORMALISATIONS:
        raise ConfigError(f"policy.normalisation: {p.normalisation!r}; valid: {', '.join(NORMALISATIONS)}")
    if p.kl_reference not in ("rollout", "initial"):
        raise ConfigError(f"policy.kl_reference: {p.kl_reference!r}; valid: rollout, initial")
    if p.ref_model_sync_steps and (p.kl_reference != "initial" or p.beta <= 0):
        raise ConfigError(f"policy.ref_model_sync_steps: syncs the frozen KL reference, which this run does not have "
                          f"(kl_reference={p.kl_reference}, beta={p.beta}); set policy.kl_reference=initial and "
                          f"policy.beta > 0, or ref_model_sync_steps=0")
    if p.ref_model_sync_steps > config.max_steps:
        raise ConfigError(f"policy.ref_model_sync_steps={p.ref_model_sync_steps}: the first sync would come after the "
                          f"last step (max_steps={config.max_steps}); use fewer steps between syncs, or 0")
    if config.value.lora.enabled and not config.value.enabled:
        raise ConfigError("value.lora.enabled: there is no value model (value.enabled=false)")
    if config.value.lora.enabled and config.value.share_backbone:
        raise ConfigError("value.lora.enabled: a value model with share_backbone=true trains only its head on the "
                          "policy's backbone; LoRA needs a backbone of its own (value.share_backbone=false)")
    check_value_use(config, algorithm)
    if config.rollout.group_size < 2 and (p.filter_equal or p.accuracy_band):
        raise ConfigError("rollout.group_size: group advantages need at least 2 responses per prompt")
    if p.accuracy_band is not None and (len(p.accuracy_band) != 2 or not 0 <= p.accuracy_band[0] <= p.accuracy_band[1] <= 1):
        raise ConfigError(f"policy.accuracy_band: [low, high] within [0, 1], got {p.accuracy_band}")
    if p.rows_per_forward < 0:
        raise ConfigError(f"policy.rows_per_forward: must be >= 0 (0 = no cap), got {p.rows_per_forward}")
    if p.ppo_epochs < 1:
        raise ConfigError(f"policy.ppo_epochs: must be >= 1, got {p.ppo_epochs}")
    if config.eval.stop_at is not None:
        raise ConfigError("eval.stop_at: early stopping at a target accuracy is an SFT option; "
                          "an RL run trains for max_steps")
    if config.task.split != "train" and config.task.source == "gym":
        raise ConfigError("task.split: RL trains on the train split (held-out problems are for eval)")
    check_curriculum(config.curriculum, config.task.source)
    check_device(config.device)
    check_attention(config.loop, config.device)
    if model is not None:
        check_rl_model(config, algorithm, model)
    return algorithm


def check_rl_model(config: RLConfig, algorithm: Algorithm, model) -> None:
    """The checks that need the loaded model (its attention kind; the algorithm's own)."""
    s = config.rollout.sampling
    if s.full_cache != "none" and model.spec.attention != "full":
        raise ConfigError(f"rollout.sampling.full_cache={s.full_cache!r} applies to full-attention models; "
                          f"this model ({model.spec.family}) uses {model.spec.attention} attention")
    algorithm.check(config, model)


def check_rl_world(config: RLConfig, world: distributed.World) -> None:
    """Whole prompt groups go to ranks (a group's advantages need all of its responses), the same
    number to each."""
    if config.rollout.num_prompts % world.size:
        raise ConfigError(f"rollout.num_prompts: {config.rollout.num_prompts} prompt groups do not split over "
                          f"{world.size} ranks; use a multiple of {world.size}")


def run_rl(config: RLConfig, *, progress: bool | str = True) -> dict:
    """The RL run: one process, or one rank of a torchrun launch (train/distributed.py)."""
    with distributed.ranks(config.distributed, config.device) as world:
        return _run_rl(config, world, progress=progress)


def _run_rl(config: RLConfig, world: distributed.World, *, progress: bool | str) -> dict:
    from tracerl.models import load_model

    algorithm = check_rl_config(config)
    rewards = Rewards(config.reward)
    check_rl_world(config, world)
    device = distributed.rank_device(config.device, world)
    problems = load_problems(config.task)
    for i, stage in enumerate(config.curriculum):  # every stage's task, now rather than at its first step
        if len(load_problems(config_at(config, stage.start).task)) < config.rollout.num_prompts:
            raise ConfigError(f"curriculum[{i}]: its task has fewer problems than rollout.num_prompts")
    if config.eval.every:
        load_problems(config.eval.task)  # a bad held-out task fails now, not at the first eval
    if len(problems) < config.rollout.num_prompts:
        raise ConfigError(f"task: {len(problems)} problems, fewer than rollout.num_prompts="
                          f"{config.rollout.num_prompts}")
    model = load_model(config.model, device=device, dtype=distributed.master_dtype(world, device),
                       block_size=config.rollout.sampling.block_size)
    check_rl_model(config, algorithm, model)
    if config.lora.enabled:
        lora.apply_lora(model, config.lora, seed=config.seed)
    prompts = prompts_for(model.tokenizer, problems, config.task)

    run = TrainingRun(model, output_dir=config.output_dir, max_steps=config.max_steps,
                      save_every=config.save_every, seed=config.seed, optim=config.optim, loop=config.loop,
                      run_config=asdict(config), world=world, distributed=config.distributed)
    setup_models(config, run)
    if config.resume:
        run.resume()
    else:
        run.start_fresh()
    out = Path(config.output_dir)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", asdict(config))

    last_eval = run.metrics.last_logged("eval_") or None  # resumed at the last step: the figures stay
    try:
        with ProgressReporter("rl", config.max_steps, unit="step", completed=run.step,
                              progress=progress if world.is_main else "off") as bar:
            if last_eval:
                bar.update(eval_acc=last_eval["accuracy"])
            stage = None
            while run.step < config.max_steps:
                if config.curriculum and stage_at(config.curriculum, run.step + 1) != stage:
                    stage = stage_at(config.curriculum, run.step + 1)
                    step_config = config_at(config, run.step + 1)
                    problems = load_problems(step_config.task)
                    prompts = prompts_for(model.tokenizer, problems, step_config.task)
                row = rl_step(step_config if config.curriculum else config, algorithm, run, problems, prompts,
                              rewards)
                if config.curriculum:
                    row.update(curriculum_stage=stage, max_new_tokens=step_config.rollout.sampling.max_new_tokens)
                run.advance()
                sync_reference(config, run)
                if config.eval.every and (run.step % config.eval.every == 0 or run.step == config.max_steps):
                    last_eval = run.evaluate(lambda m: periodic_eval(m, config.eval, config.seed))
                    row.update({f"eval_{k}": v for k, v in last_eval.items()})
                run.log(row)
                if run.should_save():
                    run.save({})
                bar.update(run.step, reward=row["reward_mean"],
                           **({"eval_acc": last_eval["accuracy"]} if last_eval else {}))
    finally:
        run.close()
    summary = {"output_dir": config.output_dir, "steps": run.step, "method": config.policy.method,
               "value_model": config.value.enabled, "final_checkpoint": str(run.last_checkpoint),
               **({"world_size": world.size} if world.distributed else {}),
               **({f"eval_{k}": v for k, v in last_eval.items()} if last_eval else {})}
    if world.is_main:
        write_json(out / "summary.json", summary)
    return summary
