"""The engine on a thread of its own, fed by asyncio request handlers.

Why a thread.  A block step is a model forward: milliseconds to seconds of compute that must not
block the event loop (health checks, new requests, disconnects and other streams go on while it
runs).  One engine thread owns the loop (``tracerl.engine.loop``), the page pool and every
request's state; handlers only put commands on a queue (add, abort) and read events back, so no
lock guards the engine's data.  Between two block steps the thread takes every queued command:
a new request joins the batch at the next block step (continuous batching), an aborted one leaves
it and its pages are free before that step.

Events, per sample, on the handler's ``asyncio.Queue`` (put with ``call_soon_threadsafe``):
``("block", BlockOutput)`` each time blocks became final (``final_length``; streamed requests
only), ``("done",
Generation)`` once, or ``("error", message)`` if the step failed (then every request of the
batch gets it, the batch is cleared and the server goes on).
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
from dataclasses import dataclass

import torch

from tracerl.engine import engine_serves
from tracerl.engine.canvas import CanvasSequence
from tracerl.engine.kv_cache import CacheGeometry, PagedKVCache, pages_for_budget
from tracerl.engine.loop import BlockLoop, CanvasLoop, final_length
from tracerl.engine.sequence import Sequence, Status, make_requests
from tracerl.engine.state import StatePool
from tracerl.errors import ConfigError
from tracerl.generation.config import SamplingConfig

log = logging.getLogger("tracerl.serve")

CPU_CACHE_BUDGET = 2 << 30  # bytes of KV pages on CPU when no size is given
GPU_CACHE_FRACTION = 0.5  # of the free device memory after loading, when no size is given


@dataclass
class BlockOutput:
    """Response tokens that became final in one step: ``start`` is the first one's index in the
    response, ``step_map`` the forward that unmasked each, ``nfe`` the request's forwards so far."""

    start: int
    token_ids: list[int]
    step_map: list[int]
    nfe: int
    logprobs: list[float] | None = None  # when the request asked for them


class Handle:
    """One sample in flight: its engine request and where its events go."""

    def __init__(self, seq: Sequence, events: asyncio.Queue, tag, loop: asyncio.AbstractEventLoop,
                 stream: bool) -> None:
        self.seq, self.events, self.tag, self.loop = seq, events, tag, loop
        self.stream = stream  # wants a "block" event per committed block (else only "done")
        self.sent = 0  # response tokens already reported
        self.done = False  # set on the event loop when the last event is read

    def post(self, kind: str, payload) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.tag, kind, payload))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


def default_num_pages(model, max_running: int) -> int:
    """Enough pages for ``max_running`` full-context requests, within a memory budget: 2 GiB on
    CPU, half the free memory on a GPU (vLLM sizes its pool from the free memory likewise)."""
    geometry = CacheGeometry.from_model(model)
    want = max_running * math.ceil(model.max_positions / model.block_size)
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        budget = int(free * GPU_CACHE_FRACTION)
    else:
        budget = CPU_CACHE_BUDGET
    return max(1, min(want, pages_for_budget(budget, geometry.bytes_per_page)))


class AsyncEngine:
    """``AsyncEngine(model, max_running=, num_pages= | kv_cache_bytes=)``; ``start()``, then
    ``submit`` / ``abort`` from the event loop, ``stop()`` at shutdown."""

    def __init__(self, model, *, max_running: int = 64, num_pages: int | None = None,
                 kv_cache_bytes: int | None = None) -> None:
        if isinstance(max_running, bool) or not isinstance(max_running, int) or max_running < 1:
            raise ConfigError(f"max_running: must be an integer >= 1, got {max_running!r}")
        self.model = model
        self.max_running = max_running
        self.paged = model.spec.attention == "block"
        # Slots as wide as any request can be: the context, rounded up to whole blocks of the
        # model's size (canvases of other block sizes are checked at submission).
        b = model.block_size
        self.columns = math.ceil(model.max_positions / b) * b
        pool = StatePool(max_running, self.columns, model.device)
        if self.paged:
            if num_pages is None and kv_cache_bytes is None:
                num_pages = default_num_pages(model, max_running)
            self.cache = PagedKVCache.for_model(model, num_pages=num_pages, budget_bytes=kv_cache_bytes)
            self.loop = BlockLoop(model, self.cache, pool, max_running)
        else:
            if num_pages is not None or kv_cache_bytes is not None:
                raise ConfigError("num_pages, kv_cache_bytes: full-attention models have no KV page pool")
            self.cache = None
            self.loop = CanvasLoop(model, pool, max_running)
        self.stats = self.loop.stats
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[int, Handle] = {}  # engine thread only
        self._next_rid = 0
        self._thread: threading.Thread | None = None
        self.failed: str | None = None  # set if the engine thread itself died
        # Read by other threads (metrics, health): plain ints, written by the engine thread.
        self.running = 0
        self.waiting = 0

    # -- the event loop's side -------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.cache.num_pages if self.cache is not None else 0

    @property
    def free_pages(self) -> int:
        return self.cache.num_free if self.cache is not None else 0

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tracerl-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is left and end the thread (the server drains its requests first)."""
        if self._thread is not None:
            self._commands.put(("stop", None))
            self._thread.join(timeout)

    def make_sequence(self, prompt_ids: list[int], config: SamplingConfig, seed: int) -> Sequence:
        """A request, checked against the pool: ``ConfigError`` naming ``max_tokens`` or
        ``block_size`` when it can never run here."""
        why = engine_serves(self.model, config)
        if why is not None:
            raise ConfigError(f"block_size: {why}; the server decodes block-attention models at their own block size")
        cls = None if self.paged else CanvasSequence
        seq = make_requests(self.model, [prompt_ids], [config], [seed], cls=cls)[0]
        if len(seq.tokens) > self.columns:
            raise ConfigError(f"block_size: {seq.block_size} makes the request {len(seq.tokens)} columns wide, "
                              f"past the context of {self.columns}; use a block size that divides it")
        if self.cache is not None and seq.num_blocks > self.cache.num_pages:
            raise ConfigError(
                f"max_tokens: the prompt ({len(prompt_ids)} tokens) and max_tokens ({config.max_new_tokens}) need "
                f"{seq.num_blocks} KV pages, the server's pool holds {self.cache.num_pages}; lower max_tokens")
        return seq

    def submit(self, seq: Sequence, events: asyncio.Queue, tag, *, stream: bool = True) -> Handle:
        handle = Handle(seq, events, tag, asyncio.get_running_loop(), stream)
        self._commands.put(("add", handle))
        return handle

    def abort(self, handle: Handle) -> None:
        self._commands.put(("abort", handle))

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                if not self._take_commands(block=self.loop.idle()):
                    break
                if self.loop.idle():
                    continue
                try:
                    batch = self.loop.step()
                except Exception as e:  # noqa: BLE001 (one failed step must not end the server)
                    log.exception("engine step failed")
                    self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                    continue
                self._report(batch)
                self._gauges()
        except BaseException as e:  # noqa: BLE001
            self.failed = f"{type(e).__name__}: {e}"
            log.exception("engine thread died")
            raise
        finally:
            self._fail_all("the server is shutting down")

    def _take_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle); False on stop."""
        while True:
            try:
                kind, handle = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "add":
                self._next_rid += 1
                handle.seq.rid = self._next_rid  # unique for the pool's lifetime
                self._handles[handle.seq.rid] = handle
                self.loop.add(handle.seq)
            elif kind == "abort" and self._handles.pop(handle.seq.rid, None) is not None:
                self.loop.abort(handle.seq)  # pages and slot free before the next step
            self._gauges()

    def _report(self, batch: list[Sequence]) -> None:
        for seq in batch:
            handle = self._handles.get(seq.rid)
            if handle is None:
                continue
            final = final_length(seq)
            if handle.stream and final > handle.sent and seq.status is not Status.FINISHED:
                n = len(seq.prompt)
                lo, hi = n + handle.sent, n + final
                lps = seq.logprob[lo:hi].tolist() if seq.config.return_logprobs else None
                handle.post("block", BlockOutput(handle.sent, seq.tokens[lo:hi].tolist(),
                                                 seq.step_map[lo:hi].tolist(), seq.nfe, lps))
                handle.sent = final
            if seq.status is Status.FINISHED:
                del self._handles[seq.rid]
                handle.post("done", seq.to_generation(self.model))

    def _fail_all(self, message: str) -> None:
        self.loop.close()
        for handle in self._handles.values():
            handle.post("error", message)
        self._handles.clear()
        self._gauges()

    def _gauges(self) -> None:
        self.running, self.waiting = len(self.loop.running), self.loop.waiting
