"""Local datasets load offline into (train, test); every failure is a DataError naming the file, line or split."""

from __future__ import annotations

import json

import datasets
import pytest
from datasets import Dataset, DatasetDict

from data.defaults import DEFAULT_SFT_DATASET
from data.errors import DataError
from data.loading import load_dataset_splits

ROWS = [{"text": "a"}, {"text": "b"}, {"text": "c"}]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_single_jsonl_file_is_train_only(tmp_path):
    """One file: all rows are train, and there is no test split (the engine skips evaluation)."""
    train, test = load_dataset_splits(str(write_jsonl(tmp_path / "rows.jsonl", ROWS)), None)
    assert train.to_list() == ROWS and test is None


def test_json_array_and_csv_and_parquet_files(tmp_path):
    """A JSON array, a CSV and a Parquet file each give the same three rows."""
    (tmp_path / "rows.json").write_text(json.dumps(ROWS, indent=1))
    (tmp_path / "rows.csv").write_text("text\na\nb\nc\n")
    Dataset.from_list(ROWS).to_parquet(str(tmp_path / "rows.parquet"))
    for name in ("rows.json", "rows.csv", "rows.parquet"):
        train, test = load_dataset_splits(str(tmp_path / name), None)
        assert train.to_list() == ROWS and test is None, name


def test_folder_with_train_and_test_files(tmp_path):
    """train.jsonl / test.jsonl become the two splits."""
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS[:1])
    train, test = load_dataset_splits(str(tmp_path), None)
    assert len(train) == 3 and test.to_list() == ROWS[:1]


def test_hub_style_parquet_shards_and_other_split_names(tmp_path):
    """data/train-0000x-of-00002.parquet shards are one split; a named test split (validation) is found too."""
    Dataset.from_list(ROWS[:2]).to_parquet(str(tmp_path / "data" / "train-00000-of-00002.parquet"))
    Dataset.from_list(ROWS[2:]).to_parquet(str(tmp_path / "data" / "train-00001-of-00002.parquet"))
    Dataset.from_list(ROWS[:1]).to_parquet(str(tmp_path / "data" / "validation-00000-of-00001.parquet"))
    train, test = load_dataset_splits(str(tmp_path), None, test_split="validation")
    assert train.to_list() == ROWS and test.to_list() == ROWS[:1]
    train, test = load_dataset_splits(str(tmp_path), None)  # default "test" absent: no evaluation
    assert test is None


def test_requested_split_name_beats_prefix(tmp_path):
    """train_sft.jsonl and train_gen.jsonl: asking for train_sft takes that file only."""
    write_jsonl(tmp_path / "train_sft.jsonl", ROWS)
    write_jsonl(tmp_path / "train_gen.jsonl", ROWS[:1])
    train, _ = load_dataset_splits(str(tmp_path), None, train_split="train_sft")
    assert len(train) == 3


def test_save_to_disk_folders(tmp_path):
    """A saved DatasetDict gives its splits; a saved Dataset is the train split."""
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:2])}).save_to_disk(
        str(tmp_path / "dict"))
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    train, test = load_dataset_splits(str(tmp_path / "dict"), None)
    assert len(train) == 3 and len(test) == 2
    train, test = load_dataset_splits(str(tmp_path / "single"), None)
    assert len(train) == 3 and test is None


def test_config_is_a_sub_folder(tmp_path):
    """--dataset_config names a sub-folder of a local dataset."""
    write_jsonl(tmp_path / "main" / "train.jsonl", ROWS)
    train, _ = load_dataset_splits(str(tmp_path), "main")
    assert len(train) == 3
    with pytest.raises(DataError, match=r"--dataset_config socratic: no such sub-folder .* \(folders: \['main'\]\)"):
        load_dataset_splits(str(tmp_path), "socratic")


def test_bundled_sft_data_loads():
    """The shipped SFT data has train and test splits of messages."""
    train, test = load_dataset_splits(str(DEFAULT_SFT_DATASET), None)
    assert train.column_names == ["messages"] and test is not None and len(test) > 0


def test_missing_path_that_is_not_a_hub_id(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset_splits(str(tmp_path / "nope.jsonl"), None)
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset_splits("./data/missing", None)


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    for name in ("empty.jsonl", "blank.jsonl"):
        with pytest.raises(DataError, match=f"{name} is empty"):
            load_dataset_splits(str(tmp_path / name), None)


def test_corrupt_jsonl_names_file_and_line(tmp_path):
    """Line 2 lacks its closing brace: the error says file:2."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_dataset_splits(str(path), None)


def test_corrupt_json_array_names_line(tmp_path):
    """A JSON array missing the comma after line 3: the decoder stops at line 4."""
    path = tmp_path / "bad.json"
    path.write_text('[\n {"text": "a"},\n {"text": "b"}\n {"text": "c"}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json:4: not valid JSON \(Expecting ',' delimiter"):
        load_dataset_splits(str(path), None)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "a"}\n["b"]\n')
    with pytest.raises(DataError, match=r"list\.jsonl:2: each line must be a JSON object"):
        load_dataset_splits(str(path), None)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "rows.txt").write_text("hello\n")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_dataset_splits(str(tmp_path / "rows.txt"), None)


def test_missing_splits_are_named(tmp_path):
    """A missing train split lists the splits that exist; so does an explicitly requested test split."""
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "validation.jsonl", ROWS)
    with pytest.raises(DataError, match=r"has no 'training' split \(splits: \['train', 'validation'\]\)"):
        load_dataset_splits(str(tmp_path), None, train_split="training")
    with pytest.raises(DataError, match=r"has no 'dev' split \(splits: \['train', 'validation'\]\)"):
        load_dataset_splits(str(tmp_path), None, test_split="dev")


def test_hub_unreachable_suggests_local_path(monkeypatch):
    """Offline (as in every test here), a Hub id fails with a hint to pass a local path; no network is touched."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as error:
        load_dataset_splits("nanopost-test/does-not-exist", None)
    message = str(error.value)
    assert "Could not reach the Hugging Face Hub" in message and "offline" in message
    assert "Pass a local file or folder" in message
