"""Two studies on a trained quickstart model, written as markdown tables into --out.

1. Dynamic vs static decoding: held-out accuracy and NFE per token of the RL checkpoint under
   static decoding (one token per forward) and confidence-threshold dynamic decoding at a few
   thresholds.
2. Block-size adaptation (paper §4.4, reference notes §6.4: no dedicated code path upstream):
   TraceRL with block 8 / 8 steps from the block-4 RL checkpoint; held-out accuracy and NFE per
   token with block 8 before and after, next to the block-4 figures.

    python benchmarks/decoding_and_blocks.py --model runs/quickstart/rl/checkpoints/step-00000130 \
        --out runs/studies --adapt-steps 60
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from tracerl.recipes.quickstart import load_quickstart_config
from tracerl.eval import periodic_eval

THRESHOLDS = (0.9, 0.7, 0.5, 0.3)


def held_out(model, heldout, **sampling) -> dict:
    config = replace(heldout, sampling=replace(heldout.sampling, **sampling))
    return periodic_eval(model, config, 0)


def main(argv: list[str] | None = None) -> int:
    from tracerl.models import load_model
    from tracerl.recipes.rl import run_rl

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="block-4 checkpoint (e.g. the quickstart's RL result)")
    ap.add_argument("--out", default="runs/studies")
    ap.add_argument("--adapt-steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heldout = load_quickstart_config().heldout
    model = load_model(args.model)
    results: dict = {"model": args.model, "command": " ".join(sys.argv)}

    rows = [("static", held_out(model, heldout, strategy="static"))]
    rows += [(f"dynamic, threshold {t}", held_out(model, heldout, strategy="dynamic", threshold=t)) for t in THRESHOLDS]
    results["decoding"] = {name: r for name, r in rows}
    decoding = ["| decoding (block 4) | held-out accuracy | NFE per token |", "|---|---|---|"]
    decoding += [f"| {name} | {r['accuracy']:.3f} | {r['nfe_per_token']:.2f} |" for name, r in rows]

    block8 = {"block_size": 8, "steps": 8, "max_new_tokens": 8}
    before4 = rows[0][1]
    before8 = held_out(model, heldout, strategy="static", **block8)
    config = load_quickstart_config(None, [
        f"rl.max_steps={args.adapt_steps}", f"rl.seed={args.seed}", "rl.save_every=0", "rl.eval.every=0",
        "rl.rollout.sampling.block_size=8", "rl.rollout.sampling.steps=8", "rl.rollout.sampling.max_new_tokens=8"])
    rl = config.rl
    rl.model, rl.output_dir = args.model, str(out / "adapt-block8")
    t0 = time.perf_counter()
    summary = run_rl(rl, progress=False)
    adapted = load_model(summary["final_checkpoint"], block_size=8)
    after8 = held_out(adapted, heldout, strategy="static", **block8)
    after8_dynamic = held_out(adapted, heldout, strategy="dynamic", threshold=0.9, **block8)
    results["adaptation"] = {"block4": before4, "block8_before": before8, "block8_after": after8,
                             "block8_after_dynamic_0.9": after8_dynamic, "steps": args.adapt_steps,
                             "minutes": (time.perf_counter() - t0) / 60}
    adaptation = ["| model | decoding | held-out accuracy | NFE per token |", "|---|---|---|---|",
                  f"| block-4 RL checkpoint | block 4, static | {before4['accuracy']:.3f} | {before4['nfe_per_token']:.2f} |",
                  f"| block-4 RL checkpoint | block 8, static | {before8['accuracy']:.3f} | {before8['nfe_per_token']:.2f} |",
                  f"| + {args.adapt_steps} TraceRL steps at block 8 | block 8, static | {after8['accuracy']:.3f} | "
                  f"{after8['nfe_per_token']:.2f} |",
                  f"| + {args.adapt_steps} TraceRL steps at block 8 | block 8, dynamic 0.9 | "
                  f"{after8_dynamic['accuracy']:.3f} | {after8_dynamic['nfe_per_token']:.2f} |"]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = "\n".join(decoding) + "\n\n" + "\n".join(adaptation) + "\n"
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
