"""Test support: a real ``tracerl serve`` (uvicorn on 127.0.0.1) in a thread of the test
process, or as a ``tracerl serve`` subprocess; helpers to read its metrics (no tests here)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import httpx

from tracerl.serve.app import Server, bind
from tracerl.serve.config import ServeConfig
from tracerl.serve.metrics import parse_metrics


class ThreadServer:
    """``with ThreadServer(config, model) as s:`` serves on ``s.url`` (``http://127.0.0.1:PORT``)."""

    def __init__(self, config: ServeConfig, model=None) -> None:
        import uvicorn

        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = Server(config, model)
        self.uv = uvicorn.Server(uvicorn.Config(self.server.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.time() + 60
        while not self.uv.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.uv.should_exit = True
        self.thread.join(30)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics").text)

    def wait_idle(self, timeout: float = 30) -> dict[str, float]:
        """Metrics once no sample runs or waits (aborts are applied between engine steps)."""
        deadline = time.time() + timeout
        while True:
            m = self.metrics()
            if m["tracerl_requests_running"] == 0 and m["tracerl_requests_waiting"] == 0:
                return m
            if time.time() > deadline:
                raise AssertionError(f"the server is still busy: {m}")
            time.sleep(0.02)


def serve_subprocess(*args: str) -> tuple[subprocess.Popen, str]:
    """``tracerl serve --port 0 ARGS`` in a subprocess; returns it and its base URL once it
    answers /health."""
    proc = subprocess.Popen([sys.executable, "-m", "tracerl", "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    if m is None:
        proc.kill()
        raise RuntimeError(f"tracerl serve did not start: {line!r} {proc.stderr.read()[-2000:]}")
    url = f"http://127.0.0.1:{m.group(1)}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("tracerl serve never answered /health")
        time.sleep(0.05)
