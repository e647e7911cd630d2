"""``task.source=datasets`` beyond single files: a real ``save_to_disk`` folder (Dataset and
DatasetDict) and a Hub dataset id read offline from a real HF cache layout
(``datasets--org--name/{refs/main, snapshots/<commit>/data/*.parquet}``)."""

from __future__ import annotations

import datasets
import pytest

from tracerl.data.jsonl import DataError
from tracerl.data.tasks import TaskConfig, load_problems

ROWS = {"question": ["1+1?", "2+2?", "3+3?"], "ground_truth_answer": ["2", "4", "6"]}
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def test_a_save_to_disk_folder(tmp_path):
    datasets.Dataset.from_dict(ROWS).save_to_disk(str(tmp_path / "plain"))
    problems = load_problems(TaskConfig(source="datasets", name=str(tmp_path / "plain"), size=0))
    assert [(p.question, p.answer, p.kind) for p in problems] == [("1+1?", "2", "math"), ("2+2?", "4", "math"),
                                                                  ("3+3?", "6", "math")]
    assert problems[0].id == "plain:1"
    split = datasets.DatasetDict({"train": datasets.Dataset.from_dict(ROWS),
                                  "test": datasets.Dataset.from_dict({k: v[:1] for k, v in ROWS.items()})})
    split.save_to_disk(str(tmp_path / "dict"))
    test = load_problems(TaskConfig(source="datasets", name=str(tmp_path / "dict"), dataset_split="test", size=0))
    assert [p.question for p in test] == ["1+1?"]
    with pytest.raises(DataError, match=r"no split 'validation' \(task.dataset_split\); it has train, test"):
        load_problems(TaskConfig(source="datasets", name=str(tmp_path / "dict"), dataset_split="validation"))


def test_a_folder_that_is_not_a_saved_dataset_says_what_it_needs(tmp_path):
    (tmp_path / "files").mkdir()
    with pytest.raises(DataError, match="must be a datasets save_to_disk folder"):
        load_problems(TaskConfig(source="datasets", name=str(tmp_path / "files")))
    with pytest.raises(DataError, match="no such file or folder"):
        load_problems(TaskConfig(source="datasets", name=str(tmp_path / "gone.jsonl")))


@pytest.fixture
def hub_dataset(tmp_path, monkeypatch):
    snap = tmp_path / "hf" / "hub" / "datasets--tracerl-test--sums" / "snapshots" / COMMIT
    (snap / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(ROWS).to_parquet(str(snap / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({k: v[2:] for k, v in ROWS.items()}).to_parquet(
        str(snap / "data" / "test-00000-of-00001.parquet"))
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path / "hf"


def test_a_hub_dataset_id_offline(hub_dataset):
    train = load_problems(TaskConfig(source="datasets", name="tracerl-test/sums", size=0))
    assert [p.answer for p in train] == ["2", "4", "6"] and train[0].id == "tracerl-test/sums:1"
    test = load_problems(TaskConfig(source="datasets", name="tracerl-test/sums", dataset_split="test", size=0))
    assert [p.answer for p in test] == ["6"]
    with pytest.raises(DataError) as e:
        load_problems(TaskConfig(source="datasets", name="tracerl-test/other"))
    assert "\n" not in str(e.value) and "HF_HUB_OFFLINE=1" in str(e.value) and "--repo-type dataset" in str(e.value)
