"""Which requests take part in the next forward, re-decided before every block step.

Memory is the only shared resource that can run out: a running request holds a page for each
block it has committed plus one for the block it is denoising, and takes a new page whenever it
moves on to the next block.  Before each step the scheduler makes the step's new pages fit: it
preempts the most recently admitted requests (their pages are freed and they restart from
scratch later, which repeats their output exactly; see ``Sequence.reset``) until they do.  The
oldest running request is therefore never preempted for a younger one, and since every admitted
request fits the pool alone (checked at submission), the oldest always progresses: no deadlock,
no livelock.  Then it admits waiting requests in order while a slot is free and their first
forward fits, with one page kept in reserve per running request so admission does not
immediately force preemption.
"""

from __future__ import annotations

from collections import deque

from tracerl.engine.kv_cache import PagedKVCache
from tracerl.engine.sequence import Sequence, Status
from tracerl.engine.state import StatePool


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_running: int, pool: StatePool) -> None:
        self.cache = cache
        self.pool = pool  # one decoding-state slot per running request
        self.max_running = max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.preemptions = 0
        self.wasted_row_forwards = 0  # forwards of preempted requests, to be recomputed

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def commit_needs(self, seqs: list[Sequence]) -> list[int]:
        """New pages each request's next forward takes: its blocks up to the current one, minus
        those it holds (prefill: the prompt's full blocks and the first denoising block)."""
        held = self.cache.held_pages_of([s.rid for s in seqs])
        return [max(0, s.block + 1 - h) for s, h in zip(seqs, held)]

    def schedule(self) -> list[Sequence]:
        """The requests of the next forward (empty when nothing is left to do)."""
        needs = self.commit_needs(self.running)
        while self.running and sum(needs) > self.cache.num_free:
            self._preempt(self.running[-1])
            needs.pop()
        budget = self.cache.num_free - sum(needs)
        while self.waiting and len(self.running) < self.max_running:
            head = self.waiting[0]
            need = self.commit_needs([head])[0]
            if self.running and need + len(self.running) > budget:  # reserve: one page per running request
                break
            self.waiting.popleft()
            self.cache.allocate(head.rid, 0)
            self.pool.bind(head)
            head.status = Status.PREFILLING
            self.running.append(head)
            budget -= need
        return list(self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.free(seq.rid)
        self.wasted_row_forwards += seq.nfe
        seq.reset()
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def retire(self, seq: Sequence) -> None:
        """A finished request leaves the running set and returns its pages."""
        self.running.remove(seq)
        self.cache.free(seq.rid)

    def idle(self) -> bool:
        return not self.running and not self.waiting
