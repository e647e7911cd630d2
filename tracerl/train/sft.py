"""Supervised fine-tuning pieces: data -> examples, the epoch sampler, the objective's options and
one optimizer batch's forward/backward (the ``tracerl sft`` recipe composes them).

Data: problems of a task source (reasoning-gym, JSONL, ...) turned into (prompt, gold response)
token ids with the task's template, or a JSONL file in one of the formats of
data/sft_formats.py (conversations, TRL's prompt/completion, upstream's prompt/response with an
optional step map, token ids).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from tracerl.data.jsonl import DataError, read_jsonl
from tracerl.data.sft_formats import FileFormat, encode_row
from tracerl.data.tasks import TaskConfig, load_problems
from tracerl.data.templates import problem_prompt_ids
from tracerl.errors import ConfigError
from tracerl.objectives import Example, build_sft_rows, count_response_tokens, sft_loss
from tracerl.objectives.sft import METHOD_FAMILIES, SFT_METHODS

log = logging.getLogger(__name__)

DEFAULT_METHOD = {"block": "block", "full": "random_masking", "shifted": "ar"}


@dataclass
class SFTDataConfig:
    task: TaskConfig = field(default_factory=lambda: TaskConfig(split="train", size=1000))
    # JSONL in one of the formats of tracerl/data/sft_formats.py: {messages}, {prompt, completion},
    # {prompt, response[, step_map]} or {prompt_ids, response_ids[, step_map]} (detected; logged)
    file: str | None = None
    chat: bool = False  # file rows with string prompts: render the prompt as a user turn of the chat template
    response_format: str = "{answer}"  # the supervised response of a task problem
    append_eos: bool = True  # end every response with the EOS token (the model learns to stop)
    # Fill the rest of the last block after the EOS with EOS targets (not for ``ar``). The sampler
    # denoises whole blocks, so the model must learn what follows the stop token; trained on rows
    # that end at the EOS it never sees those positions and fills them (and the answer) with
    # junk. LLaDA's SFT pads with |EOS| targets for the same reason (LLaDA paper, §2.3).
    pad_to_block: bool = True
    max_length: int = 1024  # prompt + response tokens; longer examples are dropped (and counted)


@dataclass
class SFTObjectiveConfig:
    method: str = "auto"  # auto (by family) | block | trace | random_masking | semi_ar | ar
    noise_low: float = 0.1  # mask level drawn from U(noise_low, noise_high)
    noise_high: float = 0.9  # upper end of the mask level
    complementary: bool = False  # random_masking: also train the complementary mask
    shrink: int = 1  # trace: merge this many consecutive steps
    block_size: int | None = None  # None: the model's block size


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


def _task_problems(data: SFTDataConfig):
    problems = load_problems(data.task)
    for p in problems:
        if p.answer is None:
            raise ConfigError(f"data.task: problem {p.id} has no reference answer to train on")
    return problems


def check_sft_data(data: SFTDataConfig) -> None:
    """Read and check the data (file rows or task problems) without a tokenizer: a bad path,
    row or task fails before any weights load."""
    if data.file:
        if data.task != SFTDataConfig().task:  # said, not silent: the file's rows are the data
            log.warning("data.file is set, so data.task (%s:%s) is not used", data.task.source, data.task.name)
        _read_file(data)
    else:
        _task_problems(data)


def _read_file(data: SFTDataConfig):
    """The file's rows and their format (every row checked; one format per file)."""
    fmt = FileFormat()
    rows = read_jsonl(data.file, fmt).rows
    if rows:
        log.info("data: %s: %d rows in the %s format", data.file, len(rows), fmt.format)
    return rows, fmt.format


def build_examples(model, data: SFTDataConfig, pad_block: int | None = None) -> tuple[list[Example], int]:
    """(examples, number dropped: longer than ``max_length`` or with an empty response).

    ``pad_block``: responses that end with the EOS are filled with EOS up to the end of their
    last block of this size (blocks by absolute position, as in the sampler); traces get
    one step per pad, after the response's last step."""
    tok = model.tokenizer
    eos = [tok.eos_token_id] if data.append_eos and tok.eos_token_id is not None else []
    examples: list[Example] = []
    if data.file:
        rows, fmt = _read_file(data)
        for line, row in rows:
            where = f"{data.file}:{line}"
            for prompt, response, step_map in encode_row(tok, row, fmt, where, chat=data.chat, eos=eos):
                try:
                    examples.append(Example(prompt, response, step_map))
                except ConfigError as e:
                    raise DataError(f"{where}: {e}") from None
    else:
        for p in _task_problems(data):
            text = data.response_format.format(answer=p.answer, question=p.question)
            examples.append(Example(problem_prompt_ids(tok, p, data.task), tok.encode(text, add_special_tokens=False) + eos))
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
             options: dict, autocast=contextlib.nullcontext, rank: int = 0, world_size: int = 1) -> dict:
    """Forward and backward of one optimizer batch, ``micro_batch`` examples at a time; the summed
    gradients are left in ``.grad`` for the optimizer step.

    Every micro-batch's loss is divided by the response-token count of the *whole* optimizer batch
    (objectives/loss.py), so the summed loss and gradients are the same whatever the split into
    micro-batches, and no division by the number of accumulation steps is needed.  The rows of
    consecutive micro-batches draw their noise from the one ``generator`` in example order, so
    the masks do not depend on the split either.

    Several ranks: ``batch`` is the whole optimizer batch on every rank; rank r forwards the r-th
    of ``world_size`` consecutive runs of micro-batches.  Every rank still draws the noise of
    every micro-batch (building rows is cheap next to a forward), so each example gets the masks
    it gets on one rank, and the returned sums (this rank's share) add up over ranks to the
    one-rank figures.
    """
    if micro_batch < 1:
        raise ConfigError(f"loop.micro_batch: must be >= 1, got {micro_batch}")
    normaliser = count_response_tokens(batch)
    starts = range(0, len(batch), micro_batch)
    if len(starts) % world_size:
        raise ConfigError(f"loop: {len(starts)} micro-batches per optimizer step do not split over {world_size} ranks")
    per_rank = len(starts) // world_size
    loss_total, targets = 0.0, 0
    for index, start in enumerate(starts):
        rows = build_sft_rows(method, model.spec, batch[start : start + micro_batch], generator, **options)
        if index // per_rank != rank:
            continue
        rows = rows.to(model.device)
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
