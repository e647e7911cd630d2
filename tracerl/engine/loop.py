"""The engine's batch, one block step at a time, with requests that may arrive and leave between steps.

``Engine.generate`` adds a whole call's requests and steps until none is left; a server
(tracerl/serve) keeps one loop for its lifetime, adds each request when it arrives, aborts it when
its client goes away, and reads after every step which blocks became final (``final_length``) to
stream them.  Both run the same code, so a served request decodes exactly as
``Engine.generate`` (hence ``generate``) decodes it.

* ``BlockLoop``: block attention (block and shifted families) on a ``PagedKVCache``, admitted and
  preempted by the ``Scheduler``, run by the ``Runner``.
* ``CanvasLoop``: full attention, whole canvases (canvas.py), admitted while a slot is free.

``make_sequence`` builds one request with an id that is unique for the loop's lifetime (the page
pool keys its pages by it).
"""

from __future__ import annotations

from collections import deque

from tracerl.engine.canvas import CanvasRunner, CanvasSequence
from tracerl.engine.kv_cache import PagedKVCache
from tracerl.engine.runner import Runner
from tracerl.engine.scheduler import Scheduler
from tracerl.engine.sequence import Sequence, Status
from tracerl.engine.state import StatePool
from tracerl.engine.stats import EngineStats

ABORTED = "abort"  # finish_reason of a request taken out before it finished


def final_length(seq: Sequence) -> int:
    """Response tokens of ``seq`` that can no longer change: every block before the one being
    denoised, or the whole response once it finished.  (A preempted request starts over and
    falls back, then repeats exactly the tokens it had.)"""
    n = len(seq.prompt)
    if seq.status is Status.FINISHED:
        return (seq.finished_at + 1 if seq.finished_at >= 0 else seq.end) - n
    return max(0, seq.block_start - n)


class BlockLoop:
    """Continuous batching over a shared page pool (block attention)."""

    def __init__(self, model, cache: PagedKVCache, pool: StatePool, max_running: int,
                 stats: EngineStats | None = None) -> None:
        self.model = model
        self.cache = cache
        self.pool = pool
        self.scheduler = Scheduler(cache, max_running, pool)
        self.runner = Runner(model, cache)
        self.stats = stats if stats is not None else EngineStats(max_running=max_running)

    def add(self, seq: Sequence) -> None:
        """Queue a request (checked by the caller: it fits the pool alone and a pool slot)."""
        self.scheduler.add(seq)

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

    def idle(self) -> bool:
        return self.scheduler.idle()

    def step(self) -> list[Sequence]:
        """One block step of every running request (admitting waiting ones first); returns the
        requests that took part, finished ones already retired."""
        runner, sched, st = self.runner, self.scheduler, self.stats
        calls, seconds, preempted, wasted = (runner.timer.forwards, runner.timer.seconds, sched.preemptions,
                                             sched.wasted_row_forwards)
        batch = sched.schedule()  # may preempt
        st.preemptions += sched.preemptions - preempted
        st.wasted_row_forwards += sched.wasted_row_forwards - wasted
        if not batch:
            return []
        st.query_tokens += runner.step(batch)
        st.forwards += 1
        st.row_forwards += len(batch)
        for s in batch:
            if s.status is Status.FINISHED:
                sched.retire(s)
                st.requests += 1
                st.new_tokens += final_length(s)
        st.model_calls += runner.timer.forwards - calls
        st.forward_seconds += runner.timer.seconds - seconds
        return batch

    def abort(self, seq: Sequence) -> None:
        """Take a request out wherever it is; its pages and slot are free for the next step."""
        if seq.status is Status.FINISHED:
            return
        if seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)
        elif seq in self.scheduler.running:
            self.scheduler.retire(seq)
        seq.finish(ABORTED)

    def close(self) -> None:
        """Abort everything (an interrupted call must not leave pages held in a reused pool)."""
        for s in [*self.scheduler.running, *self.scheduler.waiting]:
            self.abort(s)


class CanvasLoop:
    """Continuous batching over whole canvases (full attention): no shared pool, no preemption."""

    def __init__(self, model, pool: StatePool, max_running: int, stats: EngineStats | None = None) -> None:
        self.model = model
        self.pool = pool
        self.max_running = max_running
        self.runner = CanvasRunner(model)
        self.queue: deque[CanvasSequence] = deque()
        self.running: list[CanvasSequence] = []
        self.stats = stats if stats is not None else EngineStats(max_running=max_running)

    def add(self, seq: CanvasSequence) -> None:
        self.queue.append(seq)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def idle(self) -> bool:
        return not self.queue and not self.running

    def step(self) -> list[CanvasSequence]:
        while self.queue and len(self.running) < self.max_running:
            seq = self.queue.popleft()
            self.pool.bind(seq)
            seq.status = Status.PREFILLING
            self.running.append(seq)
        if not self.running:
            return []
        batch, runner, st = list(self.running), self.runner, self.stats
        calls, seconds, cached, queries = (runner.timer.forwards, runner.timer.seconds, runner.cached_row_forwards,
                                           runner.query_tokens)
        runner.step(batch)
        st.forwards += 1
        st.row_forwards += len(batch)
        self.running = [s for s in batch if s.status is not Status.FINISHED]
        for s in batch:
            if s.status is Status.FINISHED:
                st.requests += 1
                st.new_tokens += final_length(s)
        st.model_calls += runner.timer.forwards - calls
        st.forward_seconds += runner.timer.seconds - seconds
        st.cached_row_forwards += runner.cached_row_forwards - cached
        st.query_tokens += runner.query_tokens - queries
        return batch

    def abort(self, seq: CanvasSequence) -> None:
        if seq.status is Status.FINISHED:
            return
        if seq in self.queue:
            self.queue.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
        seq.finish(ABORTED)

    def close(self) -> None:
        for s in [*self.running, *self.queue]:
            self.abort(s)
