"""One RL step, generic over the algorithm (rl/algorithms): no method names here.

Per step: sample ``num_prompts`` training problems -> ``group_size`` responses each through the
one rollout path (the trace comes with every response) -> rewards -> the algorithm's advantages
(groups may be dropped, rewards never move between responses) -> the algorithm's rows -> old
log-probs (and the frozen reference's) -> with a value model, per-target GAE advantages from the
value model *before* its update, then the value update -> ``ppo_epochs`` passes of the
algorithm's loss over shuffled whole responses.  The sampler and the trainer share the same
weights: nothing is written to disk between rollout and training.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import torch

# Relative imports: this module names no RL method, not even the package's own name (a grep for
# method names over it must come back empty).
from ..errors import ConfigError
from ..models.model import atomic_folder
from ..objectives import (Example, ValueModel, gae_targets, group_advantages, rl_normaliser, target_logprobs,
                          value_loss)
from ..rewards import Rewards
from ..rollout import Sample, base_seed, rollout
from ..train import lora
from ..train.loop import TrainingRun, step_generator
from ..train.optim import OptimConfig
from .algorithms import Algorithm
from .config import RLConfig

VALUE = "value"  # the value model's name in the TrainingRun (checkpoint folders value-N)
REFERENCE = "reference"


class TargetIndex:
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


def setup_models(config: RLConfig, run: TrainingRun) -> None:
    """Give the run the models this config trains or reads besides the policy (call before
    resume): the value model, and the frozen KL reference."""
    if config.value.enabled:
        _add_value_model(config, run)
    p = config.policy
    if p.kl_reference == "initial" and p.beta > 0 and (p.ref_model_sync_steps or not lora.is_lora(run.model)):
        # A LoRA policy that never syncs needs no copy: its reference is itself with the adapter off.
        run.add_frozen_copy(REFERENCE, tracks_policy=p.ref_model_sync_steps > 0)


def _add_value_model(config: RLConfig, run: TrainingRun) -> None:
    v = config.value
    if v.share_backbone:  # the policy being trained (sharded on several ranks), not its inference copy
        value_model = ValueModel(run.model, share_backbone=True)
    else:
        # A backbone of its own, from the policy's weights; a LoRA policy's base weights, all trainable
        # (or frozen under the value model's own adapters), never the policy's adapter layers.
        backbone = run.policy_copy(base=True)
        if lora.is_lora(run.model):
            backbone.backbone.requires_grad_(True)
        value_model = ValueModel(backbone, copy_backbone=False)
    if v.lora.enabled:  # adapters on its own backbone; the head trains in full
        lora.apply_lora(value_model.lm, v.lora, seed=config.seed + 1)
    params = list(value_model.value_head.parameters()) if v.share_backbone else list(value_model.parameters())

    def save(folder):
        if not v.lora.enabled:
            return value_model.save_pretrained(folder)
        # As a LoRA policy checkpoint: merged weights (a value model ValueModel.from_pretrained
        # loads; unless value.lora.merge_on_save=false), the head, and the live adapter in
        # adapter/ (what resume restores).
        with atomic_folder(folder) as tmp:
            if v.lora.merge_on_save:
                lora.merged_copy(value_model.lm).write_files(tmp)
            else:
                value_model.lm.tokenizer.save_pretrained(tmp)
            value_model.save_head(tmp)
            lora.save_adapter(value_model.lm, tmp / "adapter")

    def load(folder):
        if v.lora.enabled:
            lora.load_adapter_weights(value_model.lm, folder / "adapter")
            value_model.load_head(folder)
            return
        loaded = ValueModel.from_pretrained(folder, value_model.backbone_lm if value_model.share_backbone else None,
                                            share_backbone=value_model.share_backbone)
        value_model.load_state_dict(loaded.state_dict())

    run.add_trained(VALUE, value_model, params, OptimConfig(lr=v.lr, grad_clip=config.optim.grad_clip),
                    save=save, load=load, forward_methods=("values",), replicated=v.share_backbone)


def sync_reference(config: RLConfig, run: TrainingRun) -> bool:
    """After step ``run.step``: every ``policy.ref_model_sync_steps`` steps, move the frozen KL
    reference toward the policy (TR-DPO; TRL's sync_ref_model).  True when it moved."""
    every = config.policy.ref_model_sync_steps
    if not every or run.step % every:
        return False
    run.sync_frozen(REFERENCE, config.policy.ref_model_mixup_alpha)
    return True


def _reference_logprobs(config: RLConfig, run: TrainingRun):
    """``fn(rows) -> target log-probs`` of the KL reference, or None without one: the frozen
    copy, or (a LoRA policy whose reference never syncs) the policy with its adapter off."""
    reference = run.frozen.get(REFERENCE)
    if reference is not None:
        return lambda sub: target_logprobs(reference, sub, policy=True)
    p = config.policy
    if p.kl_reference == "initial" and p.beta > 0 and lora.is_lora(run.model):
        def base(sub):
            with lora.adapter_disabled(run.model):
                return target_logprobs(run.model, sub, policy=True)
        return base
    return None


def check_value_use(config: RLConfig, algorithm: Algorithm) -> None:
    use = algorithm.value_model
    if config.value.enabled and use == "unsupported":
        raise ConfigError(f"value.enabled: the value model needs rows whose targets are the trace steps (every "
                          f"token a target once per step of its trajectory); policy.method={algorithm.name!r} "
                          f"cannot use it")
    if config.value.enabled and algorithm.rows_per_epoch:
        raise ConfigError(f"value.enabled: policy.method={algorithm.name!r} draws new rows for every pass; the value "
                          f"model needs one set of trace rows")
    if not config.value.enabled and use == "required":
        raise ConfigError(f"value.enabled: policy.method={algorithm.name!r} needs a value model (set value.enabled=true)")


def _lockstep(world, passes: list, dummy) -> list[tuple[object, bool]]:
    """``(pass, real)`` for this rank's forward passes, padded with ``(dummy, False)`` up to the
    most any rank has.  A sharded model's forward and backward are collectives (each layer's
    weights are gathered, its gradients reduced), so every rank must run as many; a padding pass
    runs a real row and throws its result away (its loss is multiplied by 0).  One rank: the
    passes as they are."""
    padded = [(p, True) for p in passes]
    if world.distributed:
        padded += [(dummy, False)] * (world.max(len(passes)) - len(passes))
    return padded


def _chunks(examples, size: int) -> list:
    examples = list(examples)
    return [examples[i : i + size] for i in range(0, len(examples), size)]


def _gather_rollout(world, result, problems, chosen):
    """Every rank's samples, in the order of the whole step (rank order = problem order), with
    the problems taken from this rank's own copy of the task."""
    if not world.distributed:
        return result.samples, result.reward_errors, result.reward_seconds
    parts = world.gather(([(x.problem_index, x.sample, x.generation, x.text, x.score) for x in result.samples],
                          result.reward_errors, result.reward_seconds))
    samples = [Sample(i, s, problems[chosen[i]], g, t, sc) for part, _, _ in parts for i, s, g, t, sc in part]
    return samples, [e for _, errors, _ in parts for e in errors], max(sec for _, _, sec in parts)


class _EpochRows:
    """One set of training rows of an RL step and what is aligned with its targets: old and
    reference log-probs, advantages; and this rank's forward passes over it."""

    def __init__(self, rows, world, num_examples: int, micro: int, rows_per_forward: int) -> None:
        self.rows, self.world, self.micro, self.max_rows = rows, world, micro, rows_per_forward
        self.num_examples = num_examples
        self.index = TargetIndex(rows)
        self.old_logp = self.ref_logp = self.adv = None
        # The padding pass of _lockstep (several ranks): the first forward that has targets.
        self.dummy = next((piece for i in range(num_examples) for piece in self.index.micro_batches([i], 1, rows_per_forward)
                           if piece[0].num_targets > 0), None) if world.distributed else None

    def passes(self, chunks) -> list:
        """This rank's forwards over its share of ``chunks`` (lists of examples)."""
        return [piece for chunk in self.world.share(chunks)
                for piece in self.index.micro_batches(chunk, self.micro, self.max_rows) if piece[0].num_targets > 0]

    def per_target(self, run: TrainingRun, fn) -> torch.Tensor:
        """Evaluate ``fn(sub_rows)`` (no grad) over the micro-batches the policy pass uses, aligned.
        Same precision context as the policy pass, so the first on-policy ratio is exactly 1.
        Several ranks: each fills its share of the targets, the sum over ranks has them all."""
        out = torch.zeros(self.rows.num_targets)
        with torch.no_grad(), run.autocast():
            for (sub, pos), real in _lockstep(self.world, self.passes(_chunks(range(self.num_examples), self.micro)),
                                              self.dummy):
                values = fn(sub)
                if real:
                    out[pos] = values.float().cpu()
        return self.world.sum_tensor(out)


def rl_step(config: RLConfig, algorithm: Algorithm, run: TrainingRun, problems, prompts,
            rewards: Rewards | None = None) -> dict:
    """Roll out, score and train for step ``run.step``; returns the step's metrics row.

    Several ranks: every rank draws the same problems; rank r rolls out the r-th share of whole
    prompt groups (with the inference copy of the current weights), then every rank holds every
    response, advantage and training row, and forwards its share of each pass."""
    model, step, seed, p, world = run.model, run.step, config.seed, config.policy, run.world
    value_model = run.trained[VALUE].module if VALUE in run.trained else None
    reference_logprobs = _reference_logprobs(config, run)
    rng = np.random.default_rng([seed, step])
    t0 = time.perf_counter()

    # 1. rollout and rewards: the same in-memory weights that are being trained
    model.eval()
    chosen = rng.choice(len(problems), config.rollout.num_prompts, replace=False).tolist()
    share = len(chosen) // world.size  # check_rl_world: whole groups, the same number per rank
    mine = chosen[world.rank * share : (world.rank + 1) * share]
    sampling = config.rollout.sampling
    generator_model = run.sync_inference()
    result = rollout(generator_model, [problems[i] for i in mine], [prompts[i] for i in mine], sampling,
                     seed_key=(base_seed(sampling, seed), step), samples_per_problem=config.rollout.group_size,
                     batch_size=config.rollout.batch_size, engine=config.rollout.engine,
                     reward_workers=config.loop.micro_batch,
                     fail_on_reward_error=config.fail_on_reward_error, first_index=world.rank * share,
                     rewards=rewards)
    samples, reward_errors, reward_seconds = _gather_rollout(world, result, problems, chosen)
    gens = [x.generation for x in samples]
    t2 = time.perf_counter()
    t1 = t2 - reward_seconds  # rollout = generation; reward = scoring (inside the rollout)
    scores = [x.score for x in samples]
    truncated = np.array([g.finish_reason == "length" for g in gens], dtype=bool)
    if p.truncated == "wrong":  # no stop within max_new_tokens: the given reward, incorrect, no process reward
        scores = [replace(sc, reward=p.truncated_reward, correct=False, token_rewards=None) if cut else sc
                  for sc, cut in zip(scores, truncated)]
    reward = np.array([sc.reward for sc in scores], dtype=np.float64)
    correct = np.array([sc.correct for sc in scores], dtype=bool)
    group_ids = [x.problem_index for x in samples]
    adv, keep = algorithm.advantages(reward, group_ids, correct)
    if p.truncated == "mask":  # in their group's statistics, out of the loss
        keep = keep & torch.from_numpy(~truncated)
    kept = [i for i in range(len(gens)) if bool(keep[i])]
    tokens = sum(len(g.response_ids) for g in gens)
    row = {"reward_mean": float(reward.mean()), "accuracy": float(correct.mean()),
           "response_length": tokens / len(gens), "nfe_per_token": sum(g.nfe for g in gens) / max(1, tokens),
           "kept_fraction": len(kept) / len(gens), "truncated_fraction": float(truncated.mean()),
           "reward_errors": len(reward_errors)}
    row.update(_reward_parts(scores))
    if reward_errors:
        row["reward_error_examples"] = reward_errors[:3]
    if not kept:  # every group filtered out: nothing to learn from this step
        row.update(policy_loss=0.0, time_rollout=t1 - t0, time_reward=t2 - t1, time_value=0.0, time_policy=0.0)
        return row

    examples = [Example.from_generation(gens[i]) for i in kept]
    example_adv = torch.tensor([float(adv[i]) for i in kept], dtype=torch.float32)
    micro = config.loop.micro_batch
    generator = step_generator(seed, step)
    # One set of rows for every pass, or (``algorithm.rows_per_epoch``) fresh rows per pass, all
    # built and given their old log-probs before the first update (a new random mask per inner update).
    epochs = [_EpochRows(algorithm.rows(model, examples, generator, block_size=sampling.block_size,
                                        pad_id=model.tokenizer.pad_token_id), world, len(examples), micro,
                         p.rows_per_forward)
              for _ in range(p.ppo_epochs if algorithm.rows_per_epoch else 1)]
    for e in epochs:
        # 2. old log-probs (the rollout policy) and the reference for the KL term
        e.old_logp = e.per_target(run, lambda sub: target_logprobs(model, sub, policy=True))
        if reference_logprobs is not None:
            e.ref_logp = e.per_target(run, reference_logprobs)
        e.adv = example_adv[e.rows.target_example.cpu()]

    # 3. advantages per target: the response's, or GAE over trace steps with the value model
    t3 = time.perf_counter()
    if value_model is not None:
        first = epochs[0]  # check_value_use: one set of trace rows
        old_values = first.per_target(run, value_model.values)
        outcome, process = _gae_rewards([scores[i] for i in kept], [group_ids[i] for i in kept], example_adv)
        returns, first.adv = gae_targets(first.rows, old_values, outcome, token_rewards=process,
                                         gamma=config.value.gamma, lam=config.value.lam)
        returns, first.adv = returns.float(), first.adv.float()
        var = float(returns.var()) if returns.numel() > 1 else 0.0
        row["return_mean"] = float(returns.mean())
        row["explained_variance"] = 1.0 - float((returns - old_values).var()) / var if var > 0 else 0.0
        if step % config.value.train_every == 0:
            row["value_loss"] = _update_values(config, run, value_model, first, old_values, returns, examples)
            model.backbone.zero_grad(set_to_none=True)  # shared backbone: value grads must not leak
    t4 = time.perf_counter()

    # 4. policy update: ppo_epochs passes over shuffled whole responses
    model.train()
    per_update = micro * config.loop.accumulation * world.size  # the optimizer batch, over all ranks
    stats_sum: dict[str, float] = {}
    updates, losses = 0, []
    max_len = max(len(e.response_ids) for e in examples)
    for epoch in range(p.ppo_epochs):
        e = epochs[epoch % len(epochs)]
        order = np.random.default_rng([seed, step, epoch]).permutation(len(examples))
        for start in range(0, len(order), per_update):
            batch = order[start : start + per_update]
            batch_rows = int(torch.isin(e.rows.row_example, torch.as_tensor(batch)).sum())
            normaliser = rl_normaliser(p.normalisation, [examples[i] for i in batch], num_rows=batch_rows,
                                       response_length=max_len)
            loss_total, forwards = 0.0, 0
            for (sub, pos), real in _lockstep(world, e.passes(_chunks(batch, micro)), e.dummy):
                with run.autocast():
                    logp = target_logprobs(model, sub, policy=True)
                dev = logp.device
                loss, stats = algorithm.loss(
                    logp, e.old_logp[pos].to(dev), e.adv[pos].to(dev), normaliser=normaliser,
                    ref_logprobs=e.ref_logp[pos].to(dev) if e.ref_logp is not None else None,
                    weights=sub.target_weight.to(dev), rows=sub)
                if not real:
                    (loss * 0.0).backward()
                    continue
                loss.backward()
                loss_total += float(loss.detach())
                for k in ("ratio_mean", "clip_fraction", "approx_kl") + (("ref_kl",) if reference_logprobs else ()):
                    if k in stats:
                        stats_sum[k] = stats_sum.get(k, 0.0) + float(stats[k])
                forwards += 1
            loss_total, forwards = world.sum([loss_total, forwards])  # this rank's share -> the batch's
            updates += int(forwards)
            opt = run.update(loss_total)
            losses.append(loss_total)
            row.update(lr=opt["lr"], grad_norm=opt["grad_norm"])
    keys = sorted(stats_sum)
    stats_sum = dict(zip(keys, world.sum([stats_sum[k] for k in keys])))
    t5 = time.perf_counter()
    row.update({"policy_loss": float(np.mean(losses)) if losses else 0.0,
                **{("kl" if k == "approx_kl" else k): v / max(1, updates) for k, v in stats_sum.items()},
                "optimizer_updates": len(losses), "time_rollout": t1 - t0, "time_reward": t2 - t1,
                "time_value": t4 - t3, "time_policy": t5 - t4})
    return row


def _reward_parts(scores) -> dict:
    """``reward/<function>``: each reward function's mean (unweighted) value, as TRL logs them;
    only when the rewards are combined from several functions or a user's."""
    parts = [sc.details["rewards"] for sc in scores if sc.details and "rewards" in sc.details]
    if not parts:
        return {}
    names = dict.fromkeys(name for part in parts for name in part)
    return {f"reward/{name}": float(np.mean([part[name] for part in parts if name in part])) for name in names}


def _gae_rewards(scores, group_ids, example_adv: torch.Tensor) -> tuple[list[float], list | None]:
    """The value model's rewards of the kept responses: (outcome per response, per-token process
    rewards or None).  Without a process reward, the outcome is the response's group-normalised
    advantage (as before).  With one, the process vector goes in raw (upstream's vector-reward
    mode), and the outcome is the group z-score of the rest of the reward (the scalar functions'
    part; 0 when every function is a process reward), so nothing is counted twice."""
    if all(sc.token_rewards is None for sc in scores):
        return example_adv.tolist(), None
    scalar = [sc.reward - (math.fsum(sc.token_rewards) if sc.token_rewards is not None else 0.0) for sc in scores]
    outcome, _ = group_advantages(scalar, group_ids, filter_equal=False)
    return outcome.tolist(), [sc.token_rewards for sc in scores]


def _update_values(config: RLConfig, run: TrainingRun, value_model, e: _EpochRows, old_values, returns,
                   examples) -> float:
    value_model.train()
    # The policy's normalisation (upstream's value loss is per row / L1, like its policy loss).
    normaliser = rl_normaliser(config.policy.normalisation, examples, num_rows=int(e.rows.row_example.numel()),
                               response_length=max(len(x.response_ids) for x in examples))
    total = 0.0
    for (sub, pos), real in _lockstep(run.world, e.passes(_chunks(range(len(examples)), config.loop.micro_batch)),
                                      e.dummy):
        with run.autocast():
            values = value_model.values(sub)
        dev = values.device
        loss, _ = value_loss(values, old_values[pos].to(dev), returns[pos].to(dev), normaliser=normaliser,
                             eps=config.value.eps)
        if not real:
            loss = loss * 0.0
        loss.backward()
        total += float(loss.detach()) if real else 0.0
    total = run.world.sum([total])[0]
    run.update(total, model=VALUE)  # refuses a non-finite loss (TrainingDiverged)
    value_model.eval()
    return total
