"""``tracerl eval``: generate for a task, score, and write samples.jsonl and summary.json."""

from __future__ import annotations

import json
from pathlib import Path

from tracerl.data.jsonl import write_rows
from tracerl.data.tasks import load_problems
from tracerl.eval import EvalConfig, evaluate
from tracerl.files import AtomicFile
from tracerl.progress import ProgressReporter
from tracerl.rewards import Rewards


def run_eval(config: EvalConfig, *, progress: bool | str = True) -> dict:
    from tracerl.models import check_finite, load_model

    problems = load_problems(config.task)  # a bad task fails before any weights load
    Rewards(config.reward)  # so does a bad reward function
    out = Path(config.output_dir)
    # Opened before any work (an output folder that cannot be written fails now, not after the
    # generation), written atomically; the samples are committed first, then the summary.
    with AtomicFile(out / "summary.json") as summary_file, AtomicFile(out / "samples.jsonl") as samples_file:
        model = check_finite(load_model(config.model, device=config.device), config.model)
        with ProgressReporter("eval", len(problems) * config.n, unit="sample", progress=progress) as bar:
            summary, samples = evaluate(model, problems, config, progress=lambda n: bar.update(advance=n))
            bar.update(accuracy=summary["accuracy"])
        write_rows(samples_file, samples)
        summary["samples_file"] = str(samples_file.path)
        summary_file.write(json.dumps(summary, indent=2) + "\n")
    return summary
