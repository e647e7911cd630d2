"""The decoding state of the running requests in shared tensors, one row (slot) per request.

Why.  Each forward, every running request records the tokens it unmasked (token, step, log-prob,
confidence) and clears their masks, and the engine must learn which requests finished their
block.  Done per request that is a dozen small tensor operations each, which for a tiny model on
a CPU costs as much as a quarter of the forward, and on a GPU a host sync per request.  With the
state of all running requests in ``(slots, columns)`` tensors it is a few batched operations per
group of requests and one host sync per step (the rows whose block became final).

Ownership.  While a request runs, its ``Sequence`` holds views of its slot's row (so everything
else reads ``seq.tokens`` etc. as before); before admission and after it finishes it holds its own
tensors, so a slot is reused as soon as its request leaves, and a finished request keeps its
output.  Token positions are absolute in both (column p = position p).
"""

from __future__ import annotations

import numpy as np
import torch

from tracerl.engine.sequence import Sequence, Status
from tracerl.generation.sampling import Draw

FIELDS = ("tokens", "masked", "step_map", "logprob", "confidence")
UNBOUND = "every request must hold a slot of one StatePool"


class StatePool:
    """``rows`` slots of ``columns`` positions each (at least every request's canvas width)."""

    def __init__(self, rows: int, columns: int, device: torch.device) -> None:
        self.columns = columns
        # On the CPU the engine unmasks and records through numpy views of these tensors (see record).
        self.on_host = torch.device(device).type == "cpu"
        self.tokens = torch.zeros(rows, columns, dtype=torch.long, device=device)
        self.masked = torch.zeros(rows, columns, dtype=torch.bool, device=device)
        self.step_map = torch.zeros(rows, columns, dtype=torch.long, device=device)
        self.logprob = torch.zeros(rows, columns, dtype=torch.float32, device=device)
        self.confidence = torch.zeros(rows, columns, dtype=torch.float32, device=device)
        self._free = list(range(rows - 1, -1, -1))

    def flat(self, field: torch.Tensor) -> torch.Tensor | np.ndarray:
        """One of the pool's tensors as a flat view: a numpy array on the CPU, else a tensor."""
        return field.numpy().reshape(-1) if self.on_host else field.view(-1)

    def bind(self, seq: Sequence) -> None:
        """Move the request's state into a free slot; its fields become views of the slot's row."""
        if seq.pool is not None:
            raise ValueError(f"request {seq.rid}: already holds a slot")
        slot = self._free.pop()
        width = len(seq.tokens)
        for name in FIELDS:
            row = getattr(self, name)[slot, :width]
            row.copy_(getattr(seq, name))
            setattr(seq, name, row)
        seq.slot, seq.pool = slot, self

    def release(self, seq: Sequence, keep: bool = True) -> None:
        """Give the slot back; with ``keep`` the request takes a copy of its state along."""
        if keep:
            for name in FIELDS:
                setattr(seq, name, getattr(seq, name).clone())
        self._free.append(seq.slot)
        seq.slot, seq.pool = None, None


def request_slots(seqs: list[Sequence], max_running: int, device) -> StatePool:
    """A pool with a slot per request that can run at once, as wide as the widest canvas."""
    return StatePool(min(max_running, len(seqs)), max(len(s.tokens) for s in seqs), device)


def record(seqs: list[Sequence], block, masked, chosen, d: Draw, nfe, logprobs: bool) -> None:
    """One forward's unmasking of the current blocks of ``seqs`` (bound requests of one pool and
    one block size; ``block`` ``(G, b)`` indexes their blocks in the pool's flattened rows,
    ``masked`` is the pool's mask there before this step, ``chosen`` the positions to commit from
    the draw ``d``, ``nfe`` ``(G,)`` each request's forwards including this one, ``logprobs``
    whether any of them returns log-probs), then each request whose block became final moves on
    (``Sequence.block_final``: stop check, finish or next block).

    ``block``, ``masked``, ``chosen`` and ``nfe`` are tensors on the pool's device, or numpy
    arrays for a pool on the CPU (``StatePool.on_host``: written through numpy views of its
    tensors, a few small operations, where numpy's per-operation cost is a fraction of torch's)."""
    pool = seqs[0].pool
    if pool is None:
        raise ValueError(f"record: {UNBOUND}")
    for s in seqs:
        if s.pool is not pool:
            raise ValueError(f"record: {UNBOUND}")
        s.nfe += 1
        s.step += 1
        s.status = Status.DENOISING
    host = pool.on_host
    where = np.where if host else torch.where

    def put(field: torch.Tensor, new) -> torch.Tensor | np.ndarray:
        flat = pool.flat(field)
        merged = where(chosen, np.asarray(new) if host else new, flat[block])
        flat[block] = merged
        return merged

    block_tokens = put(pool.tokens, d.tokens)
    put(pool.step_map, nfe[:, None])
    if logprobs:  # read only by outputs that asked for them
        put(pool.logprob, d.logprob.float())
        put(pool.confidence, d.confidence.float())
    still = masked & ~chosen
    pool.flat(pool.masked)[block] = still
    final = ~still.any(-1)
    finals = final.tolist()  # a host sync (a second one reads the final blocks, if any)
    if any(finals):
        for s, tokens_of_block in zip([s for s, f in zip(seqs, finals) if f], block_tokens[final].tolist()):
            s.block_final(tokens_of_block)
