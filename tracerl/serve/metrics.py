"""``GET /metrics``: Prometheus' text exposition format (version 0.0.4), written by hand.

Counters: requests by route and status code, prompt and generated tokens, aborted requests
(client gone or timed out).  Gauges (read from the engine when scraped): requests running and
waiting, KV pages free and total.  Histogram: request latency in seconds, from arrival to the
last byte of the response.  Names follow Prometheus' conventions (``_total`` counters,
``_seconds`` units, ``le`` buckets); vLLM exposes the same quantities under ``vllm:`` names.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # handlers and the exporter may run on other threads
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.aborted = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def request_done(self, route: str, status: int, seconds: float, prompt_tokens: int = 0,
                     generation_tokens: int = 0) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generation_tokens
            self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds

    def request_aborted(self) -> None:
        with self._lock:
            self.aborted += 1

    def render(self, engine) -> str:
        with self._lock:
            lines = ["# HELP tracerl_requests_total Finished HTTP requests by route and status code.",
                     "# TYPE tracerl_requests_total counter"]
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'tracerl_requests_total{{route="{route}",status="{status}"}} {n}')
            lines += _counter("tracerl_prompt_tokens_total", "Prompt tokens of served requests.", self.prompt_tokens)
            lines += _counter("tracerl_generation_tokens_total", "Generated tokens of served requests.",
                              self.generation_tokens)
            lines += _counter("tracerl_requests_aborted_total",
                              "Requests stopped before they finished (client gone or timed out).", self.aborted)
            lines += _gauge("tracerl_requests_running", "Samples decoding in the engine's batch.", engine.running)
            lines += _gauge("tracerl_requests_waiting", "Samples queued for a batch slot or KV pages.", engine.waiting)
            lines += _gauge("tracerl_kv_pages_free", "Free KV-cache pages (0 for full attention).", engine.free_pages)
            lines += _gauge("tracerl_kv_pages_total", "KV-cache pages in the pool.", engine.num_pages)
            lines += ["# HELP tracerl_request_latency_seconds Time from a request's arrival to its last byte.",
                      "# TYPE tracerl_request_latency_seconds histogram"]
            cumulative = 0
            for bound, n in zip(LATENCY_BUCKETS, self.latency_counts):
                cumulative += n
                lines.append(f'tracerl_request_latency_seconds_bucket{{le="{bound}"}} {cumulative}')
            cumulative += self.latency_counts[-1]
            lines += [f'tracerl_request_latency_seconds_bucket{{le="+Inf"}} {cumulative}',
                      f"tracerl_request_latency_seconds_sum {self.latency_sum}",
                      f"tracerl_request_latency_seconds_count {cumulative}"]
        return "\n".join(lines) + "\n"


def _counter(name: str, text: str, value) -> list[str]:
    return [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {value}"]


def _gauge(name: str, text: str, value) -> list[str]:
    return [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {value}"]


def parse_metrics(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` of an exposition (for tests and the load benchmark)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
