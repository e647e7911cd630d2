"""``tracerl sft``: supervised fine-tuning of a diffusion LM with any SFT objective.

Data: problems of a task source (reasoning-gym, JSONL, ...) turned into (prompt, gold response)
token ids with the task's template, or a JSONL file of ``{prompt, response[, step_map]}`` (the
upstream SFT format: the prompt already templated) or ``{prompt_ids, response_ids[, step_map]}``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tracerl.data.tasks import load_problems
from tracerl.devices import check_device
from tracerl.errors import ConfigError
from tracerl.eval import PeriodicEvalConfig, periodic_eval
from tracerl.files import write_json
from tracerl.generation.seeds import check_seed_value
from tracerl.progress import ProgressReporter
from tracerl.train import distributed, lora
from tracerl.train.distributed import DistributedConfig
from tracerl.train.loop import LoopConfig, TrainingRun, check_attention, step_generator
from tracerl.train.optim import OptimConfig
from tracerl.train.sft import (
    EpochSampler,
    SFTDataConfig,
    SFTObjectiveConfig,
    build_examples,
    check_sft_data,
    data_fingerprint,
    method_options,
    resolve_method,
    sft_step,
)


@dataclass
class SFTConfig:
    model: str = "tiny-block"  # preset name or checkpoint folder
    output_dir: str = "runs/sft"  # checkpoints/, metrics.jsonl, config.json, summary.json
    max_steps: int = 100  # optimizer steps
    save_every: int = 0  # 0: only the final checkpoint
    seed: int = 0  # data order, masks, initialisation of new weights
    resume: bool = False  # continue the latest checkpoint in output_dir
    device: str = "cpu"  # cpu, cuda, cuda:N, mps
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    objective: SFTObjectiveConfig = field(default_factory=SFTObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    lora: lora.LoraConfig = field(default_factory=lora.LoraConfig)
    eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        self.seed = check_seed_value(self.seed, "seed")  # torch and the data order take [0, 2**64)


def run_sft(config: SFTConfig, *, progress: bool | str = True) -> dict:
    """The SFT run: one process, or one rank of a torchrun launch (train/distributed.py)."""
    with distributed.ranks(config.distributed, config.device) as world:
        return _run_sft(config, world, progress=progress)


def _run_sft(config: SFTConfig, world: distributed.World, *, progress: bool | str) -> dict:
    from tracerl.models import load_model

    if config.eval.stop_at is not None and not config.eval.every:
        raise ConfigError(f"eval.stop_at={config.eval.stop_at}: needs periodic evaluation (set eval.every > 0)")
    # Everything that can be checked without the weights first: a bad path must not cost a load.
    device = distributed.rank_device(config.device, world)
    check_device(device)
    check_attention(config.loop, device)
    check_sft_data(config.data)
    if config.eval.every:
        load_problems(config.eval.task)
    model = load_model(config.model, device=device, dtype=distributed.master_dtype(world, device),
                       block_size=config.objective.block_size)
    method = resolve_method(config.objective, model.family)
    pad_block = None if method == "ar" or not config.data.pad_to_block else model.block_size
    examples, dropped = build_examples(model, config.data, pad_block)
    if config.lora.enabled:
        lora.apply_lora(model, config.lora, seed=config.seed)
    run = TrainingRun(model, output_dir=config.output_dir, max_steps=config.max_steps,
                      save_every=config.save_every, seed=config.seed, optim=config.optim, loop=config.loop,
                      run_config=asdict(config), world=world, distributed=config.distributed,
                      generates=bool(config.eval.every))
    try:
        sampler = EpochSampler(len(examples), config.seed, data_fingerprint(examples))
        if config.resume:
            # The data may move: the sampler compares its content with the checkpoint's instead.
            run.resume(validate=lambda state: sampler.load_state_dict(state["sampler"]), may_change=("data.file",))
        else:
            run.start_fresh()
        options = method_options(method, config.objective, model.tokenizer.pad_token_id)
        per_step = config.loop.micro_batch * config.loop.accumulation * world.size  # the global batch
        if world.is_main:
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            write_json(Path(config.output_dir) / "config.json", asdict(config))

        # A resumed run reports (and stops on) its latest evaluation until it evaluates again: resumed
        # at its last step, or after stopping at eval.stop_at, it trains no more and its summary
        # keeps the eval figures.
        last_eval = run.metrics.last_logged("eval_") or None
        stopped = bool(last_eval) and config.eval.stop_at is not None and last_eval["accuracy"] >= config.eval.stop_at
        with ProgressReporter("sft", config.max_steps, unit="step", completed=run.step,
                              progress=progress if world.is_main else "off") as bar:
            if last_eval:
                bar.update(val_acc=last_eval["accuracy"])
            while run.step < config.max_steps and not stopped:
                t0 = time.perf_counter()
                model.train()
                batch = [examples[i] for i in sampler.take(per_step)]
                out = sft_step(model, method, batch, step_generator(config.seed, run.step),
                               micro_batch=config.loop.micro_batch, options=options, autocast=run.autocast,
                               rank=world.rank, world_size=world.size)
                loss, targets = world.sum([out["loss"], out["targets"]])  # this rank's share -> the batch's
                opt = run.update(loss)
                run.advance()
                # tokens_per_s: supervised (response) tokens of the step per second of the step.
                row = {"loss": loss, **opt, "tokens": out["tokens"], "targets": int(targets),
                       "epoch": sampler.epoch, "tokens_per_s": out["tokens"] / (time.perf_counter() - t0)}
                if config.eval.every and (run.step % config.eval.every == 0 or run.step == config.max_steps):
                    last_eval = run.evaluate(lambda m: periodic_eval(m, config.eval, config.seed))
                    row.update({f"eval_{k}": v for k, v in last_eval.items()})
                    stopped = config.eval.stop_at is not None and last_eval["accuracy"] >= config.eval.stop_at
                run.log(row)
                if run.should_save() or stopped:
                    run.save({"sampler": sampler.state_dict()})
                bar.update(run.step, tokens=out["tokens"], loss=loss,
                           **({"val_acc": last_eval["accuracy"]} if last_eval else {}))
                if stopped:
                    break
    finally:
        run.close()
    summary = {"output_dir": config.output_dir, "steps": run.step, "method": method, "examples": len(examples),
               "stopped_at_accuracy": stopped,
               "dropped_too_long": dropped, "final_checkpoint": str(run.last_checkpoint),
               **({"world_size": world.size} if world.distributed else {}),
               **({f"eval_{k}": v for k, v in last_eval.items()} if last_eval else {})}
    if world.is_main:
        write_json(Path(config.output_dir) / "summary.json", summary)
    return summary
