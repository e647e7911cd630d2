"""Load test of ``tracerl serve``: concurrent clients against sequential ones, on 127.0.0.1 only.

Starts ``tracerl serve`` (a subprocess, ``--model`` tiny-block by default) and sends the same
``--requests`` requests (320) of mixed lengths once one at a time and once from each of
``--concurrency`` clients (16 and 64 by default).  The mix, fixed by ``--seed``: prompts of 4 to
80 characters, ``max_tokens`` 16 / 32 / 64 / 128, greedy and seeded sampling, a quarter of them
streamed, a tenth as chat.  Every request has a seed, so each concurrent answer must equal its
sequential answer token for token (served requests are batch-invariant); a mismatch counts as
an error, like a failed request.  Reports per run: errors, p50 / p99 latency, requests/s,
generated tokens/s, and the throughput ratio against the sequential run, all from one run.
Bounded: each request times out after 120 s and the whole run stops with the server.

    python benchmarks/serve_load.py                    # the issue's figure (several minutes on 2 cores)
    python benchmarks/serve_load.py --quick --json     # a short smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time

import httpx


def make_requests(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 +-=?"
    out = []
    for k in range(n):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 80)))
        body = {"max_tokens": rng.choice([16, 32, 64, 128]), "seed": k, "return_trace": True,
                "temperature": rng.choice([0.0, 1.0])}
        if rng.random() < 0.1:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        body["stream"] = rng.random() < 0.25
        out.append(body)
    return out


async def send(client: httpx.AsyncClient, body: dict) -> tuple[float, list[int] | None, str | None]:
    """(latency, generated token ids, error) of one request."""
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    t0 = time.perf_counter()
    try:
        if not body["stream"]:
            r = await client.post(route, json=body)
            if r.status_code != 200:
                return time.perf_counter() - t0, None, f"{r.status_code}: {r.text[:200]}"
            return time.perf_counter() - t0, r.json()["choices"][0]["tracerl"]["token_ids"], None
        ids, done = [], False
        async with client.stream("POST", route, json=body) as r:
            if r.status_code != 200:
                return time.perf_counter() - t0, None, f"{r.status_code}: {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return time.perf_counter() - t0, None, chunk["error"]["message"]
                ids += chunk["choices"][0].get("tracerl", {}).get("token_ids", [])  # the chat role chunk has none
        return time.perf_counter() - t0, ids, None if done else "stream ended before [DONE]"
    except httpx.HTTPError as e:
        return time.perf_counter() - t0, None, f"{type(e).__name__}: {e}"


async def run_load(url: str, bodies: list[dict], concurrency: int) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for k in range(len(bodies)):
        queue.put_nowait(k)
    results: dict[int, tuple] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker():
            while not queue.empty():
                k = queue.get_nowait()
                results[k] = await send(client, bodies[k])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    latencies = sorted(r[0] for r in results.values())
    tokens = sum(len(r[1]) for r in results.values() if r[1] is not None)
    return {"concurrency": concurrency, "requests": len(bodies), "seconds": seconds,
            "errors": sum(r[2] is not None for r in results.values()),
            "first_errors": [r[2] for r in results.values() if r[2] is not None][:3],
            "p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "requests_per_s": len(bodies) / seconds, "tokens_per_s": tokens / seconds,
            "outputs": {k: r[1] for k, r in results.items()}}


def start_server(model: str, max_running: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen([sys.executable, "-m", "tracerl", "serve", "--port", "0", "--model", model,
                             "--max-running", str(max_running), "--max-waiting", "1024"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    m = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
    if m is None:
        proc.kill()
        sys.exit(f"serve_load: the server did not start: {line!r} {proc.stderr.read()[-1000:]}")
    for _ in range(600):
        try:
            if httpx.get(m.group(1) + "/health").status_code == 200:
                return proc, m.group(1)
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    sys.exit("serve_load: the server never answered /health")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-block")
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--max-running", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-threads", type=int, default=None,
                    help="torch threads of the server (OMP_NUM_THREADS); default: torch's (the cores)")
    ap.add_argument("--quick", action="store_true", help="40 requests, concurrency 16")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.concurrency = 40, [16]
    bodies = make_requests(args.requests, args.seed)
    proc, url = start_server(args.model, args.max_running, args.server_threads)
    try:
        runs = [asyncio.run(run_load(url, bodies, 1))]
        for c in args.concurrency:
            runs.append(asyncio.run(run_load(url, bodies, c)))
    finally:
        proc.terminate()
        proc.wait(60)
    sequential = runs[0]
    for run in runs:
        mismatched = sum(run["outputs"][k] != sequential["outputs"][k] for k in range(len(bodies))
                         if run["outputs"][k] is not None and sequential["outputs"][k] is not None)
        run["mismatched"] = mismatched
        run["errors"] += mismatched
        run["throughput_ratio"] = run["tokens_per_s"] / sequential["tokens_per_s"]
    for run in runs:
        del run["outputs"]
    print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'p50 s':>7} {'p99 s':>7} {'req/s':>7} {'tok/s':>8} "
          f"{'x seq':>6}", file=sys.stderr if args.json else sys.stdout)
    for r in runs:
        print(f"{r['concurrency']:>7} {r['requests']:>8} {r['errors']:>6} {r['p50_s']:>7.2f} {r['p99_s']:>7.2f} "
              f"{r['requests_per_s']:>7.2f} {r['tokens_per_s']:>8.0f} {r['throughput_ratio']:>6.2f}",
              file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"model": args.model, "server_threads": args.server_threads, "runs": runs}))
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
