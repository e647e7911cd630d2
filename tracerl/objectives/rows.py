"""Training rows: the one structure every objective (SFT and RL) feeds to the model.

A *row* is one model input (one forward's worth of tokens) plus the *targets* read from it: the
response tokens whose log-probability the objective needs, each with the column whose hidden
state predicts it (the logit shift already applied), its label, the example and response index
it belongs to, its (shrunk) trace step and its weight.  Objectives differ only in how they build
rows; the forward (``target_logprobs``) and the loss (loss.py) are shared.

Two row shapes exist:

* **two-copy rows** (block family): ``[prompt | clean response | noisy copy]`` laid out by
  ``masks.two_copy_layout`` and attended with ``masks.two_copy_mask``.  Noisy block k sees the
  prompt, the clean blocks before k and itself, i.e. exactly the state the sampler saw while
  denoising block k, so one forward trains one state of *every* block at once.  When the prompt
  length is not a multiple of the block size the noisy copy starts with a copy of the prompt tail
  that shares the first response block (never masked, never a target).
* **single-copy rows** (full and shifted families, AR): ``[prompt | response state]`` with the
  model's own attention kind (``full``, ``block``) or ``causal``.

Batching: rows are **left-padded** to a common length.  Positions stay absolute per sequence
(0 at each row's first real token), padding has segment ``PAD`` and is never attended, so a
row's outputs do not depend on what it is batched with.  Blocks always follow absolute positions,
``(prompt_len + j) // block_size`` for response token j, as in the sampler.

The attention mask is a property computed from ``position_ids``/``segments`` on demand rather
than stored: a dense ``(R, 1, N, N)`` mask for every row of an RL step would dwarf the rows
themselves, so select a micro-batch (``Rows.select``/``split``) and then read its mask.

Trace rows (TraceRL and trace SFT), reference notes §2.2-2.3 and §3.2-3.3, with our block ids:

* shrink: inside each group (a block for the block family, the whole response for full/shifted),
  the distinct step values are cut into consecutive runs of ``s`` and every member is labelled
  with its run's largest value (``s = 1``: no-op);
* block family: in round r every block with tokens left masks them (shrunk step >= its current
  step ``c_k``) and targets those with step ``== c_k``; one two-copy row per round.  The number
  of rows of an example is the largest number of distinct shrunk steps in any of its blocks;
* full / shifted: one row per distinct shrunk step c; input = prompt + response with ``[M]`` at
  every response position with step >= c; targets = step == c.

Either way every response token is a target exactly once.  Only the hidden states at target
columns go through the LM head (full-vocabulary logits over whole rows are upstream's memory hog).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from tracerl import masks
from tracerl.errors import ConfigError
from tracerl.masks import CLEAN, PAD, PROMPT
from tracerl.objectives.examples import Example, as_examples

MASK_KINDS = ("two_copy", "block", "full", "causal")


@dataclass
class Rows:
    """A left-padded batch of training rows and their targets (all tensors on one device).

    Row tensors are ``(R, N)``; target tensors ``(T,)``, one entry per target token.
    ``target_row``/``target_col`` index the hidden state that predicts the target (for shifted
    families the column before the token).  ``target_example`` indexes the example list the rows
    were built from, ``target_index`` is the token's index j in that example's response,
    ``target_step`` its (shrunk) trace step (semi-AR rows: the absolute block id; 0 for the
    other objectives without a trace).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor  # masks.PAD / PROMPT / CLEAN / NOISY
    mask_kind: str  # one of MASK_KINDS
    block_size: int
    row_example: torch.Tensor  # (R,) example of each row
    target_row: torch.Tensor
    target_col: torch.Tensor
    target_label: torch.Tensor
    target_example: torch.Tensor
    target_index: torch.Tensor
    target_step: torch.Tensor
    target_weight: torch.Tensor  # float32
    num_examples: int

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_targets(self) -> int:
        return int(self.target_row.shape[0])

    @property
    def valid(self) -> torch.Tensor:
        return self.segments != PAD

    @property
    def attention_mask(self) -> torch.Tensor:
        """Boolean ``(R, 1, N, N)`` mask, True = may attend (computed on each access)."""
        if self.mask_kind == "two_copy":
            return masks.two_copy_mask(self.position_ids, self.segments, self.block_size)
        return masks.mask_for_attention(self.mask_kind, self.position_ids, self.valid, self.block_size)

    def attention_mask_for(self, model):
        """The mask to run ``model`` on: the dense one, or a FlexAttention ``BlockMask`` (same
        rules, masks.flex_block_mask) when the model trains with ``loop.attention=flex``."""
        if getattr(model, "train_attention", "sdpa") == "flex":
            return masks.flex_block_mask(self.mask_kind, self.position_ids, self.segments, self.block_size)
        return self.attention_mask

    def to(self, device: torch.device | str) -> Rows:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return Rows(**moved)

    def select(self, rows: Sequence[int] | torch.Tensor) -> Rows:
        """The given rows (in that order) with their targets; all-padding leading columns are
        dropped (target columns shifted accordingly), so a small micro-batch is not as wide as
        the widest row of the whole set."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device).reshape(-1)
        if idx.numel() != idx.unique().numel():
            raise ValueError("select: duplicate row indices")
        remap = torch.full((self.num_rows,), -1, dtype=torch.long, device=idx.device)
        remap[idx] = torch.arange(idx.numel(), device=idx.device)
        new_row = remap[self.target_row]
        keep = new_row >= 0
        order = torch.argsort(new_row[keep], stable=True)  # targets grouped in the new row order
        segments = self.segments[idx]
        used = (segments != PAD).any(0).nonzero()
        start = int(used[0]) if used.numel() else segments.shape[1]

        def tgt(t: torch.Tensor) -> torch.Tensor:
            return t[keep][order]

        return replace(
            self,
            input_ids=self.input_ids[idx, start:],
            position_ids=self.position_ids[idx, start:],
            segments=segments[:, start:],
            row_example=self.row_example[idx],
            target_row=tgt(new_row),
            target_col=tgt(self.target_col) - start,
            target_label=tgt(self.target_label),
            target_example=tgt(self.target_example),
            target_index=tgt(self.target_index),
            target_step=tgt(self.target_step),
            target_weight=tgt(self.target_weight),
        )

    def select_examples(self, examples: Iterable[int]) -> Rows:
        """The rows of the given examples (example indices are kept, not renumbered)."""
        wanted = torch.as_tensor(list(examples), dtype=torch.long, device=self.row_example.device)
        return self.select(torch.isin(self.row_example, wanted).nonzero().reshape(-1))

    def split(self, max_rows: int) -> list[Rows]:
        """Consecutive micro-batches of at most ``max_rows`` rows."""
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        return [self.select(range(s, min(s + max_rows, self.num_rows)))
                for s in range(0, self.num_rows, max_rows)]


# -- building blocks shared by every objective ---------------------------------------------------


@dataclass
class RowParts:
    """One row before batching (numpy, unpadded); target arrays are aligned."""

    ids: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    example: int
    col: np.ndarray
    label: np.ndarray
    index: np.ndarray
    step: np.ndarray
    weight: np.ndarray


def model_spec(spec_or_model: Any):
    """Accept a ``DiffusionSpec`` or anything carrying one as ``.spec`` (a ``DiffusionLM``)."""
    spec = getattr(spec_or_model, "spec", spec_or_model)
    for name in ("family", "attention", "mask_token_id", "block_size", "logit_shift"):
        if not hasattr(spec, name):
            raise TypeError(f"expected a DiffusionSpec or a model with .spec, got {type(spec_or_model)}")
    return spec


def response_blocks(prompt_len: int, response_len: int, block_size: int) -> np.ndarray:
    """Block id of each response token, from its absolute position ``prompt_len + j``."""
    return (prompt_len + np.arange(response_len)) // block_size


def shrink_steps(
    steps: Sequence[int] | np.ndarray, groups: Sequence[int] | np.ndarray, shrink: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shrink a step map inside groups (blocks, or one group for the whole response).

    Within each group the distinct step values ``u_1 < ... < u_m`` are cut into consecutive runs
    of ``shrink``; every member of a run gets the run's largest value.  Returns ``(shrunk,
    rounds)``: the shrunk step of each token and its 1-based round = the rank of its run in its
    group (round r of a group trains that group's r-th shrunk step).
    """
    if isinstance(shrink, bool) or not isinstance(shrink, int) or shrink < 1:
        raise ConfigError(f"shrink must be an integer >= 1, got {shrink!r}")
    steps = np.asarray(steps, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    if steps.shape != groups.shape or steps.ndim != 1:
        raise ValueError("steps and groups must be 1-D and of equal length")
    if steps.size == 0:
        return steps.copy(), steps.copy()
    lo = steps.min()
    span = int(steps.max() - lo) + 1
    # One sortable key per (group, step); np.unique sorts by group, then step.
    keys, inverse = np.unique((groups - groups.min()) * span + (steps - lo), return_inverse=True)
    inverse = inverse.reshape(-1)
    key_group = keys // span
    key_step = keys % span + lo
    n = keys.size
    ar = np.arange(n)
    first = np.r_[True, key_group[1:] != key_group[:-1]]
    last = np.r_[key_group[1:] != key_group[:-1], True]
    group_start = np.maximum.accumulate(np.where(first, ar, 0))
    group_end = np.minimum.accumulate(np.where(last, ar, n)[::-1])[::-1]
    run = (ar - group_start) // shrink
    label_at = np.minimum(group_start + (run + 1) * shrink - 1, group_end)
    return key_step[label_at][inverse], (run + 1)[inverse]


def _as_array(value: Any, length: int, dtype) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    return np.broadcast_to(arr, (length,)).copy() if arr.ndim == 0 else arr


def two_copy_row(
    example: Example, index: int, block_size: int, mask_id: int, masked: np.ndarray,
    target: np.ndarray, step: Any = 0, weight: Any = 1.0,
) -> RowParts:
    """``[prompt | clean response | noisy copy]`` with ``masked`` response tokens replaced by
    ``[M]`` in the noisy copy and ``target`` read at their noisy columns (block family)."""
    prompt, response = example.prompt_ids, example.response_ids
    p, n = len(prompt), len(response)
    masked, target = np.asarray(masked, bool), np.asarray(target, bool)
    if np.any(target & ~masked):
        raise ValueError("a target must be masked in the noisy copy")
    positions, segments, source = masks.two_copy_layout(p, n, block_size)
    ids = np.asarray(prompt + response, dtype=np.int64)[source.numpy()]
    tail = p % block_size if n else 0
    noisy_cols = p + n + tail + np.arange(n)
    ids[noisy_cols[masked]] = mask_id
    j = np.flatnonzero(target)
    return RowParts(
        ids, positions.numpy().astype(np.int64), segments.numpy().astype(np.int64), index,
        noisy_cols[j], np.asarray(response, dtype=np.int64)[j], j,
        _as_array(step, n, np.int64)[j], _as_array(weight, n, np.float64)[j],
    )


def single_row(
    example: Example, index: int, shift: int, mask_id: int, masked: np.ndarray,
    target: np.ndarray, step: Any = 0, weight: Any = 1.0, *, where: str = "example",
) -> RowParts:
    """``[prompt | response state]`` with ``masked`` response tokens replaced by ``[M]``; targets
    read at column ``prompt_len + j - shift``."""
    prompt, response = example.prompt_ids, example.response_ids
    p, n = len(prompt), len(response)
    if shift and p == 0 and n:
        raise ConfigError(f"{where}: empty prompt, but a shifted model predicts token 0 from the "
                          "last prompt position")
    masked, target = np.asarray(masked, bool), np.asarray(target, bool)
    ids = np.asarray(prompt + response, dtype=np.int64)
    cols = p + np.arange(n)
    ids[cols[masked]] = mask_id
    segments = np.r_[np.full(p, PROMPT), np.full(n, CLEAN)].astype(np.int64)
    j = np.flatnonzero(target)
    return RowParts(
        ids, np.arange(p + n, dtype=np.int64), segments, index, cols[j] - shift,
        np.asarray(response, dtype=np.int64)[j], j,
        _as_array(step, n, np.int64)[j], _as_array(weight, n, np.float64)[j],
    )


def collate(
    parts: list[RowParts], mask_kind: str, block_size: int, num_examples: int, pad_id: int
) -> Rows:
    """Left-pad rows to a common length and stack them into ``Rows``."""
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {mask_kind!r}; valid: {', '.join(MASK_KINDS)}")
    parts = [p for p in parts if p.col.size]  # a row without targets trains nothing
    width = max((p.ids.size for p in parts), default=0)
    r = len(parts)
    ids = np.full((r, width), pad_id, dtype=np.int64)
    pos = np.zeros((r, width), dtype=np.int64)
    seg = np.full((r, width), PAD, dtype=np.int64)
    for i, p in enumerate(parts):
        off = width - p.ids.size
        ids[i, off:], pos[i, off:], seg[i, off:] = p.ids, p.positions, p.segments
    offsets = [width - p.ids.size for p in parts]

    def cat(name: str, dtype, add=None) -> torch.Tensor:
        chunks = [getattr(p, name) + (0 if add is None else add[i]) for i, p in enumerate(parts)]
        return torch.from_numpy(np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype))

    counts = [p.col.size for p in parts]
    return Rows(
        input_ids=torch.from_numpy(ids),
        position_ids=torch.from_numpy(pos),
        segments=torch.from_numpy(seg),
        mask_kind=mask_kind,
        block_size=block_size,
        row_example=torch.tensor([p.example for p in parts], dtype=torch.long),
        target_row=torch.repeat_interleave(torch.arange(r), torch.tensor(counts, dtype=torch.long)),
        target_col=cat("col", np.int64, offsets),
        target_label=cat("label", np.int64),
        target_example=torch.repeat_interleave(
            torch.tensor([p.example for p in parts], dtype=torch.long),
            torch.tensor(counts, dtype=torch.long)),
        target_index=cat("index", np.int64),
        target_step=cat("step", np.int64),
        target_weight=cat("weight", np.float32),
        num_examples=num_examples,
    )


def row_layout(spec_or_model: Any, block_size: int | None) -> tuple[Any, int, bool]:
    """``(spec, block size, two_copy)`` of a row builder that follows the model's family:
    two-copy rows for the block family (which needs unshifted logits), single-copy otherwise."""
    spec = model_spec(spec_or_model)
    b = check_block_size(block_size, spec)
    two_copy = spec.family == "block"
    if two_copy and spec.logit_shift:
        raise ConfigError("two-copy rows need unshifted logits")
    return spec, b, two_copy


def check_block_size(block_size: int | None, spec) -> int:
    b = spec.block_size if block_size is None else block_size
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ConfigError(f"block_size must be an integer >= 1, got {b!r}")
    return b


def default_pad_id(spec, pad_id: int | None) -> int:
    # Padding is never attended and never read, so any valid id works.
    return spec.mask_token_id if pad_id is None else int(pad_id)


# -- trace rows ---------------------------------------------------------------------------------


def build_trace_rows(
    spec: Any,
    examples: Iterable[Any],
    *,
    shrink: int = 1,
    block_size: int | None = None,
    pad_id: int | None = None,
) -> Rows:
    """TraceRL / trace-SFT rows from each example's step map (default ``σ(j) = j + 1``).

    Block family: one two-copy row per round (all blocks advance one shrunk step per round).
    Full / shifted families: one single-copy row per distinct shrunk step over the response,
    attended with the model's attention kind.  Every target has weight 1; every response
    token is a target exactly once.
    """
    spec, b, two_copy = row_layout(spec, block_size)
    exs = as_examples(examples)
    parts: list[RowParts] = []
    for i, ex in enumerate(exs):
        p, n = len(ex.prompt_ids), len(ex.response_ids)
        if n == 0:
            continue
        ex, steps = _with_tail(ex)
        groups = response_blocks(p, len(steps), b) if two_copy else np.zeros(len(steps), dtype=np.int64)
        shrunk, rounds = shrink_steps(steps, groups, shrink)
        is_response = np.arange(len(steps)) < n
        for r in range(1, int(rounds[:n].max()) + 1):
            masked, target = rounds >= r, (rounds == r) & is_response
            if two_copy:
                parts.append(two_copy_row(ex, i, b, spec.mask_token_id, masked, target, shrunk))
            else:
                parts.append(single_row(ex, i, spec.logit_shift, spec.mask_token_id, masked,
                                        target, shrunk, where=f"example {i}"))
    kind = "two_copy" if two_copy else spec.attention
    return collate(parts, kind, b, len(exs), default_pad_id(spec, pad_id))


def _with_tail(ex: Example) -> tuple[Example, np.ndarray]:
    """The example with its sampler tail appended as extra (non-target) response positions, and
    the step of every position; a never-decoded tail position (step 0) gets a step after every
    other, so it stays masked in every round, as it did in the sampler."""
    steps = np.asarray(ex.steps(), dtype=np.int64)
    if not ex.tail_ids:
        return ex, steps
    tail = np.asarray(ex.tail_steps, dtype=np.int64)
    tail = np.where(tail > 0, tail, max(int(steps.max()), int(tail.max())) + 1)
    extended = Example(ex.prompt_ids, ex.response_ids + ex.tail_ids)
    return extended, np.r_[steps, tail]


# -- the shared forward ---------------------------------------------------------------------------


def target_logprobs(model, rows: Rows, *, policy: bool = False) -> torch.Tensor:
    """``log p_θ(label | row state)`` for every target, shape ``(T,)`` (float32 or wider).

    One forward over the rows; only the hidden states at target columns go through the LM head.
    ``policy=True`` renormalises over the tokens the sampler can emit (``model.unsampleable_ids``
    excluded): the RL policy is the sampling distribution, so its ratios and KL use exactly the
    log-probs the sampler drew with.  SFT keeps the plain softmax (the usual MDM/LM loss).
    """
    if rows.num_targets == 0:
        return torch.zeros(0, device=model.device)
    rows = rows.to(model.device)
    hidden, _ = model.hidden_states(
        rows.input_ids, attention_mask=rows.attention_mask_for(model), position_ids=rows.position_ids
    )
    selected = hidden[rows.target_row, rows.target_col]
    logits = model.lm_logits(selected)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # log-softmax over the vocabulary in at least float32
    if policy:
        banned = torch.tensor(model.unsampleable_ids, dtype=torch.long, device=logits.device)
        logits = logits.index_fill(-1, banned, float("-inf"))
    return logits.log_softmax(-1).gather(-1, rows.target_label[:, None]).squeeze(-1)
