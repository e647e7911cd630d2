"""Every RL algorithm from one SFT checkpoint: TraceRL with and without the value model, coupled,
random masking, d1, wd1 and SPG.

Same start, same task, same rollout budget (steps x prompts x samples) and optimiser for every
method; only ``policy.method`` / ``value.enabled`` differ (d1 and wd1 also take their inner updates
per rollout, ``policy.ppo_epochs`` = 4: more gradient steps on the same samples is their design).
Several seeds each.  Writes
``results.json``, ``accuracy.png`` (held-out accuracy per step, mean and min-max band) and
``results.md`` (the table for docs/results.md) into --out.

    python benchmarks/compare_methods.py --start runs/quickstart/sft/checkpoints/step-00000220 \
        --out runs/compare --steps 100 --seeds 0 1 2

Everything not given here comes from the quickstart recipe (tracerl/recipes/quickstart.yaml);
``--set KEY=VALUE ...`` overrides it for every run (e.g. to compare under other RL settings).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

from tracerl.recipes.quickstart import load_quickstart_config
from tracerl.train.metrics import read_metrics
from tracerl.eval import periodic_eval

METHODS = {
    "tracerl": ["policy.method=tracerl", "value.enabled=false"],
    "tracerl + value": ["policy.method=tracerl", "value.enabled=true"],
    "coupled": ["policy.method=coupled", "value.enabled=false"],
    "random_masking": ["policy.method=random_masking", "value.enabled=false"],
    "d1": ["policy.method=d1", "value.enabled=false", "policy.ppo_epochs=4"],
    "wd1": ["policy.method=wd1", "value.enabled=false", "policy.ppo_epochs=4"],
    "spg": ["policy.method=spg", "value.enabled=false"],
}


def _tag(name: str, seed: int) -> str:
    return f"{name.replace(' + ', '_')}-seed{seed}"


def _one_run(name: str, seed: int, start: str, out: str, steps: int, eval_every: int, start_accuracy: float,
             threads: int, overrides: list[str]) -> tuple[str, dict]:
    import torch

    from tracerl.recipes.rl import run_rl

    torch.set_num_threads(threads)
    tag = _tag(name, seed)
    config = load_quickstart_config(None, [
        *overrides, *[f"rl.{o}" for o in METHODS[name]], f"rl.max_steps={steps}", f"rl.seed={seed}",
        f"rl.eval.every={eval_every}", "rl.save_every=0"])
    rl = config.rl
    rl.model, rl.output_dir = start, str(Path(out) / tag)
    rl.eval = replace(config.heldout, every=rl.eval.every)
    t0 = time.perf_counter()
    run_rl(rl, progress=False)
    rows = read_metrics(Path(rl.output_dir) / "metrics.jsonl")
    curve = [(0, start_accuracy)] + [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    return tag, {"method": name, "seed": seed, "final_accuracy": curve[-1][1], "curve": curve,
                 "minutes": (time.perf_counter() - t0) / 60, "threads": threads}


def main(argv: list[str] | None = None) -> int:
    from tracerl.models import load_model
    from tracerl.report.plots import plot_series

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", required=True, help="SFT checkpoint every method starts from")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="recipe overrides for every run, e.g. rl.optim.lr=1e-4 (the method and budget keys are "
                         "set by this script)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_quickstart_config(None, args.overrides)  # a bad key fails here, before any run
    start_eval = periodic_eval(load_model(args.start), base.heldout, 0)
    print(f"start: held-out accuracy {start_eval['accuracy']:.3f}", file=sys.stderr)

    results: dict = {"start": args.start, "start_accuracy": start_eval["accuracy"], "steps": args.steps,
                     "eval_every": args.eval_every, "overrides": args.overrides, "command": " ".join(sys.argv),
                     "runs": {}}
    jobs = [(name, seed) for name in args.methods for seed in args.seeds]
    # An interrupted comparison picks up where it stopped: finished runs of the same start and
    # budget and overrides are kept (a results.json from before --set had none), an unfinished
    # run's folder is started again.
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    if all(previous.get(k, []) == results[k] for k in ("start", "steps", "eval_every", "overrides")):
        results["runs"] = {t: r for t, r in previous.get("runs", {}).items() if (r["method"], r["seed"]) in jobs}
    todo = [(name, seed) for name, seed in jobs if _tag(name, seed) not in results["runs"]]
    for name, seed in todo:
        shutil.rmtree(out / _tag(name, seed), ignore_errors=True)
    # Runs are independent: with --jobs N they run in N processes with cores/N threads each (on a
    # small CPU model that is faster than one run after another on all cores).
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_one_run, name, seed, args.start, str(out), args.steps, args.eval_every,
                               start_eval["accuracy"], threads, args.overrides) for name, seed in todo]
        for future in as_completed(futures):
            tag, run = future.result()
            results["runs"][tag] = run
            print(f"{tag}: final {run['final_accuracy']:.3f} in {run['minutes']:.1f} min", file=sys.stderr)
            (out / "results.json").write_text(json.dumps(results, indent=2))
    # Table order, whatever order the runs finished in.
    results["runs"] = {_tag(n, s): results["runs"][_tag(n, s)] for n, s in jobs}
    (out / "results.json").write_text(json.dumps(results, indent=2))

    table = ["| method | final held-out accuracy (mean ± sd) | min-max | seeds | minutes per run |",
             "|---|---|---|---|---|"]
    series, bands = {}, {}
    for name in args.methods:
        runs = [r for r in results["runs"].values() if r["method"] == name]
        finals = [r["final_accuracy"] for r in runs]
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        minutes = statistics.mean(r["minutes"] for r in runs)
        table.append(f"| {name} | {statistics.mean(finals):.3f} ± {sd:.3f} | {min(finals):.3f}-{max(finals):.3f} "
                     f"| {len(runs)} | {minutes:.1f} |")
        steps = [s for s, _ in runs[0]["curve"]]
        per_step = [[dict(r["curve"])[s] for r in runs] for s in steps]
        series[name] = (steps, [statistics.mean(v) for v in per_step])
        bands[name] = ([min(v) for v in per_step], [max(v) for v in per_step])
    plot_series(out / "accuracy.png", series, bands=bands, ylabel="held-out accuracy",
                title=f"Held-out accuracy per RL step ({len(args.seeds)} seeds, band = min-max)")
    steps = [s for s, _ in next(iter(results["runs"].values()))["curve"]]
    curves = ["| method | seed | " + " | ".join(f"step {s}" for s in steps) + " |",
              "|---|---|" + "---|" * len(steps)]
    for run in results["runs"].values():
        curves.append(f"| {run['method']} | {run['seed']} | " + " | ".join(f"{a:.3f}" for _, a in run["curve"]) + " |")
    (out / "results.md").write_text("\n".join(table) + "\n\nHeld-out accuracy per step:\n\n" + "\n".join(curves) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
