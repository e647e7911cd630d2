"""``tracerl serve`` as a real subprocess: SIGTERM lets the running requests finish (their
outputs complete and exact), then the server exits with code 0 and stops listening."""

from __future__ import annotations

import signal
import threading
import time

import httpx

from tests.support.serving import serve_subprocess
from tracerl import LLM, SamplingParams
from tracerl.serve.metrics import parse_metrics


def test_sigterm_drains_running_requests_then_exits():
    proc, url = serve_subprocess("--model", "tiny-block", "--max-running", "4")
    try:
        bodies = [{"prompt": f"request {k}", "max_tokens": 192, "ignore_eos": True, "temperature": 1.0, "seed": k}
                  for k in range(3)]
        answers: dict[int, httpx.Response] = {}

        def call(k: int) -> None:
            answers[k] = httpx.post(url + "/v1/completions", json=bodies[k], timeout=120)

        threads = [threading.Thread(target=call, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while parse_metrics(httpx.get(url + "/metrics").text)["tracerl_requests_running"] < 3:
            assert time.time() < deadline, "the requests never ran"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert not answers  # the signal came while all three were running
        for t in threads:
            t.join(120)
        code = proc.wait(60)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err[-2000:]
    assert "stopped (SIGTERM)" in out
    # Each prompt is request 0 of its own HTTP request, so its seed is derive_seed(k, 0, 0) as here.
    llm = LLM("tiny-block")
    wants = [llm.generate(b["prompt"], SamplingParams(max_tokens=192, ignore_eos=True, temperature=1.0,
                                                      seed=b["seed"]))[0].outputs[0] for b in bodies]
    for k, want in enumerate(wants):
        assert answers[k].status_code == 200, answers[k].text
        got = answers[k].json()["choices"][0]
        assert (got["text"], got["finish_reason"]) == (want.text, "length")
    try:
        httpx.get(url + "/health", timeout=2)
        raise AssertionError("the server still answers after its shutdown")
    except httpx.TransportError:
        pass
