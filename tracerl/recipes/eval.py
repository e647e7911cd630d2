"""``tracerl eval``: generate for a task, score, and write samples.jsonl and summary.json."""

from __future__ import annotations

import json
from pathlib import Path

from tracerl.data.jsonl import write_jsonl
from tracerl.data.tasks import load_problems
from tracerl.eval import EvalConfig, evaluate


def run_eval(config: EvalConfig, *, show_progress: bool = True) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tracerl.models import load_model

    problems = load_problems(config.task)  # a bad task fails before any weights load
    model = load_model(config.model, device=config.device)
    out = Path(config.output_dir)
    with Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), disable=not show_progress, transient=False) as bar:
        task_id = bar.add_task("eval", total=len(problems) * config.n)
        summary, samples = evaluate(model, problems, config, progress=lambda n: bar.advance(task_id, n))
    write_jsonl(out / "samples.jsonl", samples)
    summary["samples_file"] = str(out / "samples.jsonl")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
