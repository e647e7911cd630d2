"""``tracerl sft``: supervised fine-tuning of a diffusion LM with any SFT objective.

Data: problems of a task source (reasoning-gym, JSONL, ...) turned into (prompt, gold response)
token ids with the task's template, or a JSONL file of ``{prompt, response[, step_map]}`` (the
upstream SFT format: the prompt already templated) or ``{prompt_ids, response_ids[, step_map]}``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tracerl.data.jsonl import DataError, check_field, read_jsonl
from tracerl.data.tasks import TaskConfig, load_problems
from tracerl.errors import ConfigError
from tracerl.generation import SamplingConfig
from tracerl.objectives import Example, build_sft_rows, count_response_tokens, sft_loss
from tracerl.objectives.sft import METHOD_FAMILIES, SFT_METHODS
from tracerl.train import lora
from tracerl.train.loop import LoopConfig, TrainingRun, step_generator
from tracerl.train.optim import OptimConfig

DEFAULT_METHOD = {"block": "block", "full": "random_masking", "shifted": "ar"}


@dataclass
class SFTDataConfig:
    task: TaskConfig = field(default_factory=lambda: TaskConfig(split="train", size=1000))
    file: str | None = None  # JSONL of {prompt, response[, step_map]} or {prompt_ids, response_ids[, step_map]}
    response_format: str = "{answer}"  # the supervised response of a task problem
    append_eos: bool = True
    # Fill the rest of the last block after the EOS with EOS targets (not for ``ar``). The sampler
    # denoises whole blocks, so the model must learn what follows the stop token; trained on rows
    # that end at the EOS it never sees those positions and fills them (and the answer) with
    # junk. LLaDA's SFT pads with |EOS| targets for the same reason (LLaDA paper, §2.3).
    pad_to_block: bool = True
    max_length: int = 1024  # prompt + response tokens; longer examples are dropped (and counted)


@dataclass
class SFTObjectiveConfig:
    method: str = "auto"  # auto (by family) | block | trace | random_masking | semi_ar | ar
    noise_low: float = 0.1
    noise_high: float = 0.9
    complementary: bool = False  # random_masking: also train the complementary mask
    shrink: int = 1  # trace: merge this many consecutive steps
    block_size: int | None = None  # None: the model's block size


@dataclass
class PeriodicEvalConfig:
    every: int = 0  # evaluate every N steps (0: never during training)
    task: TaskConfig = field(default_factory=lambda: TaskConfig(split="eval", size=32))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    n: int = 1
    batch_size: int = 32
    stop_at: float | None = None  # SFT: stop once the eval accuracy reaches this (hand RL a partly trained model)


@dataclass
class SFTConfig:
    model: str = "tiny-block"
    output_dir: str = "runs/sft"
    max_steps: int = 100
    save_every: int = 0  # 0: only the final checkpoint
    seed: int = 0
    resume: bool = False
    device: str = "cpu"
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    objective: SFTObjectiveConfig = field(default_factory=SFTObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    lora: lora.LoraConfig = field(default_factory=lora.LoraConfig)
    eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)


class EpochSampler:
    """Seeded shuffling without replacement, epoch after epoch; its position is checkpointed.

    ``fingerprint`` (of the examples, see ``data_fingerprint``) is stored with the position so
    that a resume on other data is refused rather than silently continuing at a meaningless
    position."""

    def __init__(self, size: int, seed: int, fingerprint: str | None = None) -> None:
        if size < 1:
            raise ConfigError("data: the dataset is empty")
        self.size, self.seed, self.fingerprint = size, seed, fingerprint
        self.epoch, self.cursor = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.size)

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self._order()
            take = min(k - len(out), self.size - self.cursor)
            out.extend(order[self.cursor : self.cursor + take].tolist())
            self.cursor += take
            if self.cursor == self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "size": self.size, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise ConfigError(f"resume: the dataset has {self.size} examples, the checkpoint was made with "
                              f"{state['size']}; resume with the same data")
        saved = state.get("fingerprint")
        if saved is not None and self.fingerprint is not None and saved != self.fingerprint:
            raise ConfigError(f"resume: the dataset differs from the one the checkpoint was made with (same size "
                              f"{self.size}, other examples); resume with the same data")
        self.epoch, self.cursor = state["epoch"], state["cursor"]


def data_fingerprint(examples: list[Example]) -> str:
    """A hash of the examples' token ids (and step maps), in order."""
    h = hashlib.sha256()
    for ex in examples:
        for part in (ex.prompt_ids, ex.response_ids, ex.step_map or []):
            h.update(np.asarray(part, dtype=np.int64).tobytes())
            h.update(b"|")
        h.update(b"\n")
    return h.hexdigest()[:16]


def build_examples(model, data: SFTDataConfig, pad_block: int | None = None) -> tuple[list[Example], int]:
    """(examples, number dropped: longer than ``max_length`` or with an empty response).

    ``pad_block``: responses that end with the EOS are filled with EOS up to the end of their
    last block of this size (blocks by absolute position, as in the sampler); traces get
    one step per pad, after the response's last step."""
    tok = model.tokenizer
    eos = [tok.eos_token_id] if data.append_eos and tok.eos_token_id is not None else []
    examples: list[Example] = []
    if data.file:
        def validate(row, where):
            if "prompt_ids" in row:
                check_field(row, "prompt_ids", list, where)
                check_field(row, "response_ids", list, where)
            else:
                check_field(row, "prompt", str, where)
                check_field(row, "response", str, where)
            if "step_map" in row:
                check_field(row, "step_map", list, where)

        for line, row in read_jsonl(data.file, validate).rows:
            if "prompt_ids" in row:
                prompt, response = row["prompt_ids"], row["response_ids"]
            else:
                prompt = tok.encode(row["prompt"], add_special_tokens=False)
                response = tok.encode(row["response"], add_special_tokens=False) + eos
            try:
                examples.append(Example(prompt, response, row.get("step_map")))
            except ConfigError as e:
                raise DataError(f"{data.file}:{line}: {e}") from None
    else:
        from tracerl.evaluation import prompt_ids

        for p in load_problems(data.task):
            if p.answer is None:
                raise ConfigError(f"data.task: problem {p.id} has no reference answer to train on")
            text = data.response_format.format(answer=p.answer, question=p.question)
            examples.append(Example(prompt_ids(model, p, data.task), tok.encode(text, add_special_tokens=False) + eos))
    if not examples:
        raise DataError("data: the dataset is empty")
    # An empty response has nothing to supervise (and would make a batch of them a 0/0 loss).
    nonempty = [e for e in examples if e.response_ids]
    if not nonempty:
        raise DataError(f"data: all {len(examples)} examples have an empty response")
    if pad_block and tok.eos_token_id is not None:
        nonempty = [_pad_to_block(e, pad_block, int(tok.eos_token_id)) for e in nonempty]
    kept = [e for e in nonempty if len(e.prompt_ids) + len(e.response_ids) <= data.max_length]
    if not kept:
        raise DataError(f"data: all {len(examples)} examples are longer than data.max_length={data.max_length}")
    return kept, len(examples) - len(kept)


def resolve_method(config: SFTObjectiveConfig, family: str) -> str:
    method = DEFAULT_METHOD[family] if config.method == "auto" else config.method
    if method not in SFT_METHODS:
        raise ConfigError(f"objective.method: unknown {method!r}; valid: auto, {', '.join(SFT_METHODS)}")
    if family not in METHOD_FAMILIES[method]:
        raise ConfigError(f"objective.method: {method!r} does not apply to the {family} family "
                          f"(valid for: {', '.join(METHOD_FAMILIES[method])})")
    return method


def method_options(method: str, c: SFTObjectiveConfig, pad_id: int | None) -> dict:
    opts = {"block": dict(low=c.noise_low, high=c.noise_high, block_size=c.block_size),
            "trace": dict(shrink=c.shrink, block_size=c.block_size),
            "random_masking": dict(low=c.noise_low, high=c.noise_high, complementary=c.complementary,
                                   block_size=c.block_size),
            "semi_ar": dict(low=c.noise_low, high=c.noise_high, block_size=c.block_size),
            "ar": {}}[method]
    return {**opts, "pad_id": pad_id}


def sft_step(model, method: str, batch: list[Example], generator: torch.Generator, *, micro_batch: int,
             options: dict, autocast=contextlib.nullcontext) -> dict:
    """Forward and backward of one optimizer batch, ``micro_batch`` examples at a time; the summed
    gradients are left in ``.grad`` for the optimizer step.

    Every micro-batch's loss is divided by the response-token count of the *whole* optimizer batch
    (objectives/loss.py), so the summed loss and gradients are the same whatever the split into
    micro-batches, and no division by the number of accumulation steps is needed.  The rows of
    consecutive micro-batches draw their noise from the one ``generator`` in example order, so
    the masks do not depend on the split either.
    """
    if micro_batch < 1:
        raise ConfigError(f"loop.micro_batch: must be >= 1, got {micro_batch}")
    normaliser = count_response_tokens(batch)
    loss_total, targets = 0.0, 0
    for start in range(0, len(batch), micro_batch):
        rows = build_sft_rows(method, model.spec, batch[start : start + micro_batch], generator,
                              **options).to(model.device)
        with autocast():
            loss, stats = sft_loss(model, rows, normaliser)
        loss.backward()
        loss_total += float(loss.detach())
        targets += int(stats["targets"])
    return {"loss": loss_total, "tokens": normaliser, "targets": targets}


def _pad_to_block(ex: Example, block: int, eos: int) -> Example:
    if ex.response_ids[-1] != eos:
        return ex
    end = len(ex.prompt_ids) + len(ex.response_ids)
    fill = -end % block
    if not fill:
        return ex
    steps = None
    if ex.step_map is not None:
        last = max(ex.step_map)
        steps = ex.step_map + list(range(last + 1, last + 1 + fill))
    return Example(ex.prompt_ids, ex.response_ids + [eos] * fill, steps)


def run_sft(config: SFTConfig, *, progress: bool = True) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tracerl.models import load_model

    if config.eval.stop_at is not None and not config.eval.every:
        raise ConfigError(f"eval.stop_at={config.eval.stop_at}: needs periodic evaluation (set eval.every > 0)")
    model = load_model(config.model, device=config.device, block_size=config.objective.block_size)
    method = resolve_method(config.objective, model.family)
    pad_block = None if method == "ar" or not config.data.pad_to_block else model.block_size
    examples, dropped = build_examples(model, config.data, pad_block)
    if config.lora.enabled:
        lora.apply_lora(model, config.lora, seed=config.seed)
    run = TrainingRun(model, output_dir=config.output_dir, max_steps=config.max_steps,
                      save_every=config.save_every, seed=config.seed, optim=config.optim, loop=config.loop,
                      run_config=asdict(config))
    try:
        sampler = EpochSampler(len(examples), config.seed, data_fingerprint(examples))
        if config.resume:
            # The data may move: the sampler compares its content with the checkpoint's instead.
            run.resume(validate=lambda state: sampler.load_state_dict(state["sampler"]), may_change=("data.file",))
        else:
            run.start_fresh()
        options = method_options(method, config.objective, model.tokenizer.pad_token_id)
        per_step = config.loop.micro_batch * config.loop.accumulation
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.output_dir) / "config.json").write_text(json.dumps(asdict(config), indent=2))

        last_eval, stopped = None, False
        with Progress(TextColumn("sft"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[info]}"), console=Console(stderr=True),
                      disable=not progress) as bar:
            task = bar.add_task("sft", total=config.max_steps, completed=run.step, info="")
            while run.step < config.max_steps:
                t0 = time.perf_counter()
                model.train()
                batch = [examples[i] for i in sampler.take(per_step)]
                out = sft_step(model, method, batch, step_generator(config.seed, run.step),
                               micro_batch=config.loop.micro_batch, options=options, autocast=run.autocast)
                opt = run.optimizer_step(out["loss"])
                # tokens_per_s: supervised (response) tokens of the step per second of the step.
                row = {"loss": out["loss"], **opt, "tokens": out["tokens"], "targets": out["targets"],
                       "epoch": sampler.epoch, "tokens_per_s": out["tokens"] / (time.perf_counter() - t0)}
                if config.eval.every and (run.step % config.eval.every == 0 or run.step == config.max_steps):
                    last_eval = periodic_eval(model, config.eval, config.seed)
                    row.update({f"eval_{k}": v for k, v in last_eval.items()})
                    stopped = config.eval.stop_at is not None and last_eval["accuracy"] >= config.eval.stop_at
                run.log(row)
                if run.should_save() or stopped:
                    run.save({"sampler": sampler.state_dict()})
                bar.update(task, completed=run.step, info=f"loss {out['loss']:.3f}")
                if stopped:
                    break
    finally:
        run.close()
    summary = {"output_dir": config.output_dir, "steps": run.step, "method": method, "examples": len(examples),
               "stopped_at_accuracy": stopped,
               "dropped_too_long": dropped, "final_checkpoint": str(run.last_checkpoint),
               **({f"eval_{k}": v for k, v in last_eval.items()} if last_eval else {})}
    (Path(config.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def periodic_eval(model, config: PeriodicEvalConfig, seed: int) -> dict:
    from tracerl.evaluation import EvalConfig, evaluate

    model.eval()
    problems = load_problems(config.task)
    eval_config = EvalConfig(task=config.task, sampling=config.sampling, n=config.n, k=[1],
                             batch_size=config.batch_size, seed=seed)
    summary, _ = evaluate(model, problems, eval_config)
    return {"accuracy": summary["accuracy"], "nfe_per_token": summary["nfe_per_token"],
            "response_length": summary["mean_response_length"], "problems": summary["problems"]}
