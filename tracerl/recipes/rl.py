"""``tracerl rl``: the RL loop, one process per rank, one in-memory model.

Per RL step: sample ``num_prompts`` training problems -> ``group_size`` responses each with the
configured sampler (the trace comes with every response) -> rewards -> group advantages
(z-score within the group; groups may be dropped, rewards never move between responses) ->
optional value update (advantages from the value model *before* its update, GAE over the trace
steps) -> ``ppo_epochs`` passes of PPO-clip over shuffled whole responses -> metrics, periodic
held-out evaluation, checkpoints.  The sampler and the trainer share the same weights: nothing is
written to disk between rollout and training, and the optimizer state persists across steps.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tracerl.data.tasks import TaskConfig, load_problems
from tracerl.errors import ConfigError
from tracerl.generation import SamplingConfig, generate
from tracerl.objectives import (
    NORMALISATIONS,
    RL_METHODS,
    ValueModel,
    gae_targets,
    group_advantages,
    policy_loss,
    rl_normaliser,
    rl_rows,
    target_logprobs,
    value_loss,
)
from tracerl.rewards import Score, score_batch
from tracerl.train import checkpoint as ckpt
from tracerl.train.loop import LoopConfig, TrainingRun, step_generator
from tracerl.train.optim import OptimConfig, Optimizer
from tracerl.train.sft import PeriodicEvalConfig, periodic_eval


@dataclass
class RolloutConfig:
    num_prompts: int = 8
    group_size: int = 8
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0))
    batch_size: int = 64  # sequences per generate() call


@dataclass
class PolicyConfig:
    method: str = "tracerl"  # tracerl | random_masking | coupled
    shrink: int = 1  # tracerl: merge this many consecutive trace steps per round
    mask_samples: int = 1  # random_masking / coupled: corruptions per response
    noise_low: float = 0.1
    noise_high: float = 0.9
    ppo_epochs: int = 1
    eps: float = 0.2
    logratio_clamp: float = 10.0
    beta: float = 0.0  # k3 KL weight
    kl_reference: str = "rollout"  # rollout (upstream: the policy that sampled) | initial (frozen copy)
    normalisation: str = "token_mean"  # token_mean | upstream (1/L1 per row)
    filter_equal: bool = True  # drop groups whose rewards are all equal (they carry no signal)
    accuracy_band: list[float] | None = None  # e.g. [0.2, 0.8]: keep groups with accuracy inside
    rows_per_forward: int = 0  # cap on training rows per forward, for memory (0 = a micro-batch's rows)


@dataclass
class ValueConfig:
    enabled: bool = False
    share_backbone: bool = False  # False: a separate copy of the backbone (upstream-compatible)
    gamma: float = 1.0
    lam: float = 1.0
    eps: float = 0.2  # value clipping
    lr: float = 5e-6
    train_every: int = 1  # update the value model every N RL steps (advantages every step)


@dataclass
class RLConfig:
    model: str = "tiny-block"
    output_dir: str = "runs/rl"
    max_steps: int = 20
    save_every: int = 0
    seed: int = 0
    resume: bool = False
    device: str = "cpu"
    task: TaskConfig = field(default_factory=lambda: TaskConfig(split="train", size=256))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    value: ValueConfig = field(default_factory=ValueConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    loop: LoopConfig = field(default_factory=LoopConfig)  # micro_batch = responses per micro-batch
    eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)
    fail_on_reward_error: bool = False  # a reward function that raises: 0 reward, reported (or stop)


def check_rl_config(config: RLConfig, model) -> None:
    """Incompatible options fail here, before any work, with the reason."""
    p, v, s = config.policy, config.value, config.rollout.sampling
    if p.method not in RL_METHODS:
        raise ConfigError(f"policy.method: unknown {p.method!r}; valid: {', '.join(RL_METHODS)}")
    if p.normalisation not in NORMALISATIONS:
        raise ConfigError(f"policy.normalisation: {p.normalisation!r}; valid: {', '.join(NORMALISATIONS)}")
    if p.kl_reference not in ("rollout", "initial"):
        raise ConfigError(f"policy.kl_reference: {p.kl_reference!r}; valid: rollout, initial")
    if v.enabled and p.method != "tracerl":
        raise ConfigError(f"value.enabled: the value model needs trace rows (every token a target once "
                          f"per step of its trajectory); policy.method={p.method!r} cannot use it")
    if s.full_cache != "none" and model.spec.attention != "full":
        raise ConfigError(f"rollout.sampling.full_cache={s.full_cache!r} applies to full-attention models; "
                          f"this model ({model.spec.family}) uses {model.spec.attention} attention")
    if config.rollout.group_size < 2 and (p.filter_equal or p.accuracy_band):
        raise ConfigError("rollout.group_size: group advantages need at least 2 responses per prompt")
    if p.accuracy_band is not None and (len(p.accuracy_band) != 2 or not 0 <= p.accuracy_band[0] <= p.accuracy_band[1] <= 1):
        raise ConfigError(f"policy.accuracy_band: [low, high] within [0, 1], got {p.accuracy_band}")
    if p.rows_per_forward < 0:
        raise ConfigError(f"policy.rows_per_forward: must be >= 0 (0 = no cap), got {p.rows_per_forward}")
    if p.ppo_epochs < 1 or p.shrink < 1 or p.mask_samples < 1:
        raise ConfigError("policy.ppo_epochs, policy.shrink and policy.mask_samples must be >= 1")
    if config.eval.stop_at is not None:
        raise ConfigError("eval.stop_at: early stopping at a target accuracy is an SFT option; "
                          "an RL run trains for max_steps")
    if config.task.split != "train" and config.task.source == "gym":
        raise ConfigError("task.split: RL trains on the train split (held-out problems are for eval)")


def _safe_scores(problems, texts, workers: int, fail: bool) -> tuple[list[Score], list[str]]:
    """Score; a reward function that raises gives 0 for that sample and a report naming it."""
    try:
        return score_batch(problems, texts, workers=workers), []
    except Exception:
        pass
    scores, errors = [], []
    for p, t in zip(problems, texts):
        try:
            scores.append(score_batch([p], [t], workers=1)[0])
        except Exception as e:
            if fail:
                raise
            errors.append(f"problem {p.id}: {type(e).__name__}: {e} (response {t[:80]!r})")
            scores.append(Score(0.0, False, None, {"error": traceback.format_exc(limit=2)}))
    return scores, errors


class _TargetIndex:
    """Maps the targets of a row subset back to positions in the full target arrays."""

    def __init__(self, rows) -> None:
        self.rows = rows
        self.stride = int(rows.target_index.max()) + 1 if rows.num_targets else 1
        keys = rows.target_row.cpu() * self.stride + rows.target_index.cpu()
        self.order = torch.argsort(keys)
        self.sorted = keys[self.order]

    def positions(self, sub, global_rows: torch.Tensor) -> torch.Tensor:
        keys = global_rows[sub.target_row.cpu()] * self.stride + sub.target_index.cpu()
        return self.order[torch.searchsorted(self.sorted, keys)]

    def micro_batches(self, examples, size: int, max_rows: int = 0):
        """``(rows, their positions in the full target arrays)`` for each chunk of ``size``
        examples, split further into forwards of at most ``max_rows`` rows (0: no cap).  Losses
        are sums over targets divided by a per-optimizer-batch constant, so splitting one
        response's rows over forwards changes nothing but peak memory (a full-attention trace
        has one row per decoding step)."""
        examples = torch.as_tensor(examples).reshape(-1)
        for start in range(0, examples.numel(), size):
            chosen = torch.isin(self.rows.row_example, examples[start : start + size])
            global_rows = chosen.nonzero().reshape(-1)
            for piece in global_rows.split(max_rows) if max_rows > 0 else (global_rows,):
                sub = self.rows.select(piece)
                yield sub, self.positions(sub, piece.cpu())


def run_rl(config: RLConfig, *, progress: bool = True) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tracerl.evaluation import prompt_ids
    from tracerl.models import load_model

    block = config.rollout.sampling.block_size
    model = load_model(config.model, device=config.device, block_size=block)
    check_rl_config(config, model)
    problems = load_problems(config.task)
    if len(problems) < config.rollout.num_prompts:
        raise ConfigError(f"task: {len(problems)} problems, fewer than rollout.num_prompts="
                          f"{config.rollout.num_prompts}")
    prompts = [prompt_ids(model, p, config.task) for p in problems]

    run = TrainingRun(model, output_dir=config.output_dir, max_steps=config.max_steps,
                      save_every=config.save_every, seed=config.seed, optim=config.optim, loop=config.loop,
                      run_config=asdict(config))
    value_model = value_opt = None
    if config.value.enabled:
        value_model = ValueModel(model, share_backbone=config.value.share_backbone)
        value_params = list(value_model.value_head.parameters()) if config.value.share_backbone \
            else list(value_model.parameters())
        value_opt = Optimizer(value_params, OptimConfig(lr=config.value.lr, grad_clip=config.optim.grad_clip),
                              config.max_steps)
    reference = copy.deepcopy(model).eval() if config.policy.kl_reference == "initial" and config.policy.beta > 0 else None
    if reference is not None:
        for param in reference.parameters():
            param.requires_grad_(False)

    state = run.resume() if config.resume else run.start_fresh()
    if state is not None and value_model is not None:
        _load_value(value_model, value_opt, run.last_checkpoint, state)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2))

    last_eval = None
    with Progress(TextColumn("rl"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("rl", total=config.max_steps, completed=run.step, info="")
        while run.step < config.max_steps:
            row = rl_step(config, model, value_model, value_opt, reference, run, problems, prompts)
            run.step += 1
            if config.eval.every and (run.step % config.eval.every == 0 or run.step == config.max_steps):
                last_eval = periodic_eval(model, config.eval, config.seed)
                row.update({f"eval_{k}": v for k, v in last_eval.items()})
            run.log(row)
            if run.should_save():
                if value_model is not None:
                    _save_value(value_model, out, run.step)
                extra = {"value_optimizer": value_opt.state_dict()} if value_opt is not None else {}
                run.save(extra)
                _prune_value_folders(out)
            bar.update(task, completed=run.step, info=f"reward {row['reward_mean']:.3f}")
    run.close()
    summary = {"output_dir": config.output_dir, "steps": run.step, "method": config.policy.method,
               "value_model": config.value.enabled, "final_checkpoint": str(run.last_checkpoint),
               **({f"eval_{k}": v for k, v in last_eval.items()} if last_eval else {})}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def rl_step(config: RLConfig, model, value_model, value_opt, reference, run: TrainingRun, problems, prompts) -> dict:
    step, seed, p = run.step, config.seed, config.policy
    rng = np.random.default_rng([seed, step])
    t0 = time.perf_counter()

    # 1. rollout: the same in-memory weights that are being trained
    model.eval()
    chosen = rng.choice(len(problems), config.rollout.num_prompts, replace=False).tolist()
    jobs = [i for i in chosen for _ in range(config.rollout.group_size)]
    group_ids = [g for g, _ in enumerate(chosen) for _ in range(config.rollout.group_size)]
    gens = []
    for start in range(0, len(jobs), config.rollout.batch_size):
        sampling = SamplingConfig(**{**config.rollout.sampling.to_dict(), "seed": seed * 100_003 + step * 1009 + start})
        gens += generate(model, [prompts[i] for i in jobs[start : start + config.rollout.batch_size]], sampling)
    t1 = time.perf_counter()

    # 2. rewards, attached to their own responses
    texts = [model.tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in gens]
    scores, errors = _safe_scores([problems[i] for i in jobs], texts, config.loop.micro_batch,
                                  config.fail_on_reward_error)
    rewards = np.array([s.reward for s in scores], dtype=np.float64)
    correct = np.array([s.correct for s in scores], dtype=bool)
    adv, keep = group_advantages(rewards, group_ids, filter_equal=p.filter_equal,
                                 accuracy_band=tuple(p.accuracy_band) if p.accuracy_band else None,
                                 correct=correct)
    kept = [i for i in range(len(gens)) if bool(keep[i])]
    tokens = sum(len(g.response_ids) for g in gens)
    row = {"reward_mean": float(rewards.mean()), "accuracy": float(correct.mean()),
           "response_length": tokens / len(gens), "nfe_per_token": sum(g.nfe for g in gens) / max(1, tokens),
           "kept_fraction": len(kept) / len(gens), "reward_errors": len(errors)}
    if errors:
        row["reward_error_examples"] = errors[:3]
    t2 = time.perf_counter()
    if not kept:  # every group filtered out: nothing to learn from this step
        row.update(policy_loss=0.0, time_rollout=t1 - t0, time_reward=t2 - t1, time_value=0.0, time_policy=0.0)
        return row

    examples = [gens[i] for i in kept]
    example_adv = torch.tensor([float(adv[i]) for i in kept], dtype=torch.float32)
    rows = rl_rows(p.method, model.spec, examples, step_generator(seed, step), shrink=p.shrink,
                   block_size=config.rollout.sampling.block_size, mask_samples=p.mask_samples,
                   low=p.noise_low, high=p.noise_high, pad_id=model.tokenizer.pad_token_id)
    index = _TargetIndex(rows)
    micro = config.loop.micro_batch

    def per_target(fn):
        """Evaluate ``fn(sub_rows)`` (no grad) over the micro-batches the policy pass uses, aligned.
        Same precision context as the policy pass, so the first on-policy ratio is exactly 1."""
        out = torch.zeros(rows.num_targets)
        with torch.no_grad(), run.autocast():
            for sub, pos in index.micro_batches(torch.arange(len(examples)), micro, p.rows_per_forward):
                out[pos] = fn(sub).float().cpu()
        return out

    # 3. old log-probs (the rollout policy) and the reference for the KL term
    old_logp = per_target(lambda sub: target_logprobs(model, sub, policy=True))
    ref_logp = per_target(lambda sub: target_logprobs(reference, sub, policy=True)) if reference is not None else None

    # 4. advantages: group z-score per response, or GAE over trace steps with the value model
    t3 = time.perf_counter()
    if value_model is not None:
        old_values = per_target(value_model.values)
        returns, target_adv = gae_targets(rows, old_values, example_adv.tolist(),
                                          gamma=config.value.gamma, lam=config.value.lam)
        returns, target_adv = returns.float(), target_adv.float()
        var = float(returns.var()) if returns.numel() > 1 else 0.0
        row["explained_variance"] = 1.0 - float((returns - old_values).var()) / var if var > 0 else 0.0
        if step % config.value.train_every == 0:
            row["value_loss"] = _update_values(config, run, value_model, value_opt, index, old_values, returns,
                                               examples, step)
            model.backbone.zero_grad(set_to_none=True)  # shared backbone: value grads must not leak
    else:
        target_adv = example_adv[rows.target_example.cpu()]
    t4 = time.perf_counter()

    # 5. policy update: ppo_epochs passes over shuffled whole responses
    model.train()
    per_update = micro * config.loop.accumulation
    stats_sum: dict[str, float] = {}
    updates, losses = 0, []
    max_len = max(len(e.response_ids) for e in examples)
    for epoch in range(p.ppo_epochs):
        order = np.random.default_rng([seed, step, epoch]).permutation(len(examples))
        for start in range(0, len(order), per_update):
            batch = order[start : start + per_update]
            batch_rows = int(torch.isin(rows.row_example, torch.as_tensor(batch)).sum())
            normaliser = rl_normaliser(p.normalisation, [examples[i] for i in batch], num_rows=batch_rows,
                                       response_length=max_len)
            loss_total = 0.0
            for sub, pos in index.micro_batches(batch, micro, p.rows_per_forward):
                if sub.num_targets == 0:
                    continue
                with run.autocast():
                    logp = target_logprobs(model, sub, policy=True)
                dev = logp.device
                loss, stats = policy_loss(
                    logp, old_logp[pos].to(dev), target_adv[pos].to(dev), normaliser=normaliser, eps=p.eps,
                    logratio_clamp=p.logratio_clamp, beta=p.beta,
                    ref_logprobs=ref_logp[pos].to(dev) if ref_logp is not None else None,
                    weights=sub.target_weight.to(dev))
                loss.backward()
                loss_total += float(loss.detach())
                for k in ("ratio_mean", "clip_fraction", "approx_kl"):
                    stats_sum[k] = stats_sum.get(k, 0.0) + float(stats[k])
                updates += 1
            opt = run.optimizer.step(step, loss_total)
            losses.append(loss_total)
            row.update(lr=opt["lr"], grad_norm=opt["grad_norm"])
    t5 = time.perf_counter()
    row.update({"policy_loss": float(np.mean(losses)) if losses else 0.0,
                **{("kl" if k == "approx_kl" else k): v / max(1, updates) for k, v in stats_sum.items()},
                "optimizer_updates": len(losses), "time_rollout": t1 - t0, "time_reward": t2 - t1,
                "time_value": t4 - t3, "time_policy": t5 - t4})
    return row


def _update_values(config, run, value_model, value_opt, index, old_values, returns, examples, step) -> float:
    value_model.train()
    micro = config.loop.micro_batch
    # The policy's normalisation (upstream's value loss is per row / L1, like its policy loss).
    normaliser = rl_normaliser(config.policy.normalisation, examples, num_rows=int(index.rows.row_example.numel()),
                               response_length=max(len(e.response_ids) for e in examples))
    total = 0.0
    for sub, pos in index.micro_batches(torch.arange(len(examples)), micro, config.policy.rows_per_forward):
        with run.autocast():
            values = value_model.values(sub)
        dev = values.device
        loss, _ = value_loss(values, old_values[pos].to(dev), returns[pos].to(dev), normaliser=normaliser,
                             eps=config.value.eps)
        loss.backward()
        total += float(loss.detach())
    value_opt.step(step, total)  # refuses a non-finite loss (TrainingDiverged)
    value_model.eval()
    return total


def _value_dir(output_dir: Path, step: int) -> Path:
    return ckpt.checkpoints_dir(output_dir) / f"value-{step:08d}"


def _save_value(value_model, output_dir: Path, step: int) -> None:
    # Written before the policy checkpoint of the same step: the policy folder (renamed into place
    # last) is what marks the step complete, so a value folder without it is ignored on resume.
    value_model.save_pretrained(_value_dir(output_dir, step))


def _prune_value_folders(output_dir: Path) -> None:
    """Drop value-model folders whose policy checkpoint is gone (``loop.keep_last``) or was never
    completed (a run killed between the two saves)."""
    kept = {p.name.split("-")[1] for p in ckpt.list_checkpoints(output_dir)}
    for folder in ckpt.checkpoints_dir(output_dir).glob("value-*"):
        if folder.name.split("-")[1] not in kept:
            shutil.rmtree(folder, ignore_errors=True)


def _load_value(value_model, value_opt, policy_checkpoint: Path, state: dict) -> None:
    step = int(state["step"])
    folder = _value_dir(policy_checkpoint.parent.parent, step)
    if not folder.is_dir():
        raise ConfigError(f"resume: value model of step {step} missing ({folder})")
    loaded = ValueModel.from_pretrained(folder, value_model.backbone_lm if value_model.share_backbone else None,
                                        share_backbone=value_model.share_backbone)
    value_model.load_state_dict(loaded.state_dict())
    if "value_optimizer" in state:
        value_opt.load_state_dict(state["value_optimizer"])
