"""``tracerl score``: score generations of any system, row by row, keeping every row in order."""

from __future__ import annotations

from pathlib import Path

from tracerl.data.jsonl import BadLine, DataError, check_field, iter_jsonl, write_rows
from tracerl.data.tasks import TaskConfig, problem_from_row, validate_code_row, validate_math_row
from tracerl.files import AtomicFile
from tracerl.progress import ProgressReporter
from tracerl.rewards import Rewards

# Where the gold answer is, when --answer-field is not given: the upstream JSONL field, then the
# field of tracerl's own eval samples (tracerl eval --samples).
ANSWER_FIELDS = ("ground_truth_answer", "answer")
SCORE_CHUNK = 64  # rows per scoring call: the progress line's granularity (code runs stay parallel within one)


def score_file(task: str, input_path: str | Path, output_path: str | Path, *, skip_bad_rows: bool = False,
               workers: int = 2, answer_field: str | None = None, progress: bool | str = False,
               rewards: Rewards | None = None) -> dict:
    """Write every input row, in order, with ``reward``, ``correct`` and ``extracted_answer`` (math)
    or ``verdicts`` (code) added.  A malformed row stops the run with file, line and field named;
    with ``skip_bad_rows`` it is written back unscored with an ``error`` field instead (a line that
    is not a JSON object as ``{"raw": its text or value}``), so rows can never shift against their
    scores, and the summary lists it (``skipped_rows``: "file:line: reason" each).

    The output is written atomically and opened first: a destination that cannot be written fails
    before any scoring, and a failed write (a full disk) leaves no partial file.

    ``rewards``: the reward functions (rewards/functions.py; default the task's verifier); they
    see the row's ``token_ids`` as ``response_ids`` when it has them (tracerl eval's samples), else
    an empty list; their values are added as ``rewards`` (and ``token_rewards``)."""
    rewards = rewards or Rewards()
    with AtomicFile(output_path) as output:
        out_rows, errors = _score_rows(task, input_path, skip_bad_rows, workers, answer_field, progress, rewards)
        write_rows(output, out_rows)
    scored = [row for row, error in zip(out_rows, errors) if error is None]
    rewards = [row["reward"] for row in scored]
    return {
        "task": task, "rows": len(out_rows), "scored": len(scored), "skipped": len(out_rows) - len(scored),
        "skipped_rows": [e for e in errors if e is not None],
        # Nothing scored means no accuracy, not an accuracy of 0.
        "accuracy": sum(bool(row["correct"]) for row in scored) / len(scored) if scored else None,
        "mean_reward": sum(rewards) / len(scored) if scored else None,
        "output": str(output.path),
    }


def _score_rows(task: str, input_path, skip_bad_rows: bool, workers: int, answer_field: str, progress: bool | str,
                rewards: Rewards) -> tuple[list[dict], list[str | None]]:
    """(every row with its scores, per row the reason it was skipped or None)."""
    rows, problems, responses, ids, errors = [], [], [], [], []
    for line_no, row in iter_jsonl(input_path):
        where = f"{input_path}:{line_no}"
        try:
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            check_field(row, "response", str, where)
            if "token_ids" in row:
                check_field(row, "token_ids", list, where)
            field = answer_field or next((f for f in ANSWER_FIELDS if f in row), ANSWER_FIELDS[0])
            if task == "math":
                if field not in row:
                    raise DataError(f"{where}: missing field {' or '.join(map(repr, ANSWER_FIELDS)) if answer_field is None else repr(field)} "
                                    f"(the gold answer); name the row's answer field with --answer-field NAME")
                # the question is optional when scoring: only the gold answer is needed
                validate_math_row(row, where, question_field=None, answer_field=field)
            else:
                validate_code_row(row, where, question_field=None)
        except DataError as e:
            if not skip_bad_rows:
                raise
            rows.append(row if isinstance(row, dict) else {"raw": row.text if isinstance(row, BadLine) else row})
            errors.append(str(e))
            continue
        rows.append(row)
        errors.append(None)
        config = TaskConfig(source="jsonl", name=str(input_path), kind=task, answer_field=field,
                            question_field="question")
        problems.append(problem_from_row({"question": "", **row}, task, f"line {line_no}", config))
        responses.append(row["response"])
        ids.append(row.get("token_ids", []))

    done: list = []
    with ProgressReporter("score", len(problems), unit="row", progress=progress) as bar:
        for start in range(0, len(problems), SCORE_CHUNK):
            chunk = slice(start, start + SCORE_CHUNK)
            done += rewards.score(problems[chunk], responses[chunk], ids[chunk], workers=workers)
            bar.update(len(done), accuracy=sum(bool(sc.correct) for sc in done) / len(done))
    scores = iter(done)
    out_rows = []
    for row, error in zip(rows, errors):
        if error is not None:
            out_rows.append({**row, "reward": None, "correct": None, "error": error})
            continue
        sc = next(scores)
        extra = {"extracted_answer": sc.extracted_answer} if task == "math" else \
            {k: v for k, v in (sc.details or {}).items() if k != "rewards"}
        if not rewards.is_default:
            extra["rewards"] = sc.details["rewards"]
            if sc.token_rewards is not None:
                extra["token_rewards"] = sc.token_rewards
        out_rows.append({**row, "reward": sc.reward, "correct": sc.correct, **extra})
    return out_rows, errors
