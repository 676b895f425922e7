"""Load the train and test splits of a dataset from a local file or folder, or from the Hugging Face Hub.

    load_dataset_splits("data/bundled/chat")              # folder with train.jsonl / test.jsonl
    load_dataset_splits("my_rows.jsonl")                  # one file: all train, no test split
    load_dataset_splits("saved_with_save_to_disk/")       # a DatasetDict or Dataset folder
    load_dataset_splits("trl-lib/Capybara", None)         # Hub id (needs network or the local HF cache)

Local paths always work offline. Anything that is not an existing path but looks like a Hub id (`name` or
`owner/name`) goes to `datasets.load_dataset`. Every failure is a one-line `DataError` that names the file (and
line, for broken JSON), the splits that exist, or — for the Hub — that it could not be reached and a local path
works instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from data.errors import DataError

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
"""File suffix -> `datasets` builder for local data files."""

KNOWN_SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def load_dataset_splits(
    dataset_name: str,
    dataset_config: str | None = None,
    train_split: str = "train",
    test_split: str | None = "test",
):
    """Load `(train, test)` datasets.

    Args:
        dataset_name: A local file (.json, .jsonl, .parquet, .csv), a local folder (files named after splits such
            as `train.jsonl`, `test-00000-of-00001.parquet`, `data/train-*.parquet`, or a `save_to_disk` folder),
            or a Hub dataset id.
        dataset_config: Hub configuration name; for a local folder, a sub-folder holding that configuration.
        train_split: Split to train on (must exist).
        test_split: Split to evaluate on. If it does not exist, None is returned (no evaluation) when it is the
            default "test"; a split named explicitly must exist. None: no test split.

    Returns:
        `(train, test)`: `datasets.Dataset`s; `test` is None when there is no test split.

    Raises:
        DataError: Path not found, empty or broken file, missing split, or Hub unreachable / dataset not found.
    """
    if not dataset_name:
        raise DataError("--dataset_name is empty; pass a local file or folder, or a Hub dataset id.")
    path = Path(dataset_name).expanduser()
    if path.exists():
        requested = {name for name in (train_split, test_split) if name}
        loaders = _local_split_loaders(path, dataset_config, requested)
        source = str(path)
    elif _looks_like_hub_id(dataset_name):
        loaders = _hub_split_loaders(dataset_name, dataset_config)
        source = f"Hub dataset '{dataset_name}'" + (f" ({dataset_config})" if dataset_config else "")
    else:
        raise DataError(
            f"--dataset_name {dataset_name}: no such file or folder (and it is not a Hub id like owner/name)."
        )

    if train_split not in loaders:
        raise DataError(
            f"{source} has no '{train_split}' split (splits: {sorted(loaders) or 'none'}); pick one with "
            "--dataset_train_split."
        )
    train = loaders[train_split]()
    if len(train) == 0:
        raise DataError(f"{source}: the '{train_split}' split has no rows.")

    test = None
    if test_split is not None and test_split != train_split:
        if test_split in loaders:
            test = loaders[test_split]()
            if len(test) == 0:
                test = None
        elif test_split != "test":
            raise DataError(
                f"{source} has no '{test_split}' split (splits: {sorted(loaders)}); pick one with "
                "--dataset_test_split, or leave it at 'test' to skip evaluation when there is none."
            )
    return train, test


# ---------------------------------------------------------------------------------------------------- local


def _looks_like_hub_id(name: str) -> bool:
    if name.startswith((".", "/", "~")) or "\\" in name:
        return False
    if Path(name).suffix.lower() in DATA_FILE_BUILDERS:
        return False
    return _HUB_ID.match(name) is not None


def _split_of(file: Path, root: Path, split_names: set[str]) -> str | None:
    """Split a data file belongs to: its name (`train.jsonl`, `train-0000.parquet`) or its folder (`train/`)."""
    stem = file.name.split(".")[0]
    for name in sorted(split_names, key=len, reverse=True):
        if stem == name or re.match(rf"^{re.escape(name)}[-_]", stem):
            return name
    for parent in file.relative_to(root).parents:
        if parent.name in split_names:
            return parent.name
    return None


def _local_split_loaders(path: Path, dataset_config: str | None, requested_splits: set[str]) -> dict:
    if path.is_file():
        if dataset_config:
            raise DataError(f"--dataset_config {dataset_config} does not apply to a single file ({path}).")
        _check_suffix(path)
        return {"train": lambda: _load_files([path])}

    if dataset_config:
        if not (path / dataset_config).is_dir():
            configs = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise DataError(f"--dataset_config {dataset_config}: no such sub-folder in {path} (folders: {configs}).")
        path = path / dataset_config

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _saved_split_loaders(path)

    files = sorted(
        file for file in path.rglob("*")
        if file.is_file() and file.suffix.lower() in DATA_FILE_BUILDERS and ".cache" not in file.parts
    )
    if not files:
        raise DataError(
            f"{path} holds no data files ({', '.join(sorted(DATA_FILE_BUILDERS))}) and is not a save_to_disk folder."
        )
    by_split: dict[str, list[Path]] = {}
    # Requested names count too, and the longest name wins: `train_sft.jsonl` is split "train_sft" if asked for.
    split_names = set(KNOWN_SPLIT_NAMES) | requested_splits
    for file in files:
        split = _split_of(file, path, split_names)
        if split is not None:
            by_split.setdefault(split, []).append(file)
    if not by_split:  # no file is named after a split: all of them are training data (as `datasets` does)
        by_split = {"train": files}
    return {split: (lambda split_files=split_files: _load_files(split_files)) for split, split_files in by_split.items()}


def _saved_split_loaders(path: Path) -> dict:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        saved = load_from_disk(str(path))
    except Exception as error:
        raise DataError(f"{path}: could not read this save_to_disk folder ({error}).") from None
    if isinstance(saved, Dataset):
        return {"train": lambda: saved}
    assert isinstance(saved, DatasetDict)
    return {split: (lambda split=split: saved[split]) for split in saved}


def _check_suffix(file: Path) -> str:
    builder = DATA_FILE_BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise DataError(
            f"{file}: unsupported file type '{file.suffix}'; use one of {', '.join(sorted(DATA_FILE_BUILDERS))}."
        )
    return builder


def _load_files(files: list[Path]):
    from datasets import load_dataset

    builders = {_check_suffix(file) for file in files}
    if len(builders) > 1:
        raise DataError(f"One split mixes file types ({[str(f) for f in files]}); use one type per split.")
    builder = builders.pop()
    for file in files:
        if file.stat().st_size == 0 or (builder != "parquet" and not file.read_bytes().strip()):
            raise DataError(f"{file} is empty.")
        if builder != "parquet":
            text = _decode(file)
            if not text.strip():  # e.g. only a byte-order mark
                raise DataError(f"{file} is empty.")
            if builder == "json":
                _check_json_types(file, text)
    try:
        return load_dataset(builder, data_files=[str(file) for file in files], split="train")
    except Exception as error:
        if builder == "json":
            for file in files:
                _raise_json_error(file)
        cause = error.__cause__ or error
        raise DataError(
            f"Could not read {', '.join(str(f) for f in files)} as {builder}: {type(cause).__name__}: {cause}"
        ) from None


def _decode(file: Path) -> str:
    """The file's text: UTF-8, with or without a byte-order mark; else one line naming the file and byte offset."""
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{file} is not UTF-8 text: byte 0x{raw[error.start]:02x} at byte offset {error.start} (line {line}) "
            "cannot be decoded; convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None


def _kind(value) -> str | None:
    """JSON type of `value` in words; None for null (a missing value, allowed anywhere)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "an object"


def _check_json_types(file: Path, text: str) -> None:
    """Refuse rows whose field holds another JSON type than the same field in earlier rows (text in one row, a
    list or number in another), naming the row and field. Loaded as they are, such rows would be coerced (a
    number read as text, or text as a number) or fail deep inside the loader."""
    rows = _json_rows(text)
    if rows is None:  # not valid JSON rows: _raise_json_error names the broken line when loading fails
        return
    seen: dict[str, tuple[str, int]] = {}

    def walk(value, field: str, row: int) -> None:
        kind = _kind(value)
        if kind is None:
            return
        first = seen.setdefault(field, (kind, row))
        if first[0] != kind:
            raise DataError(
                f"Row {row}: field '{field}' is {kind}, but in row {first[1]} it is {first[0]} ({file}); every row "
                "must give a field the same type (text where text is expected)."
            )
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{field}.{key}" if field else key, row)
        elif isinstance(value, list):
            for item in value:
                walk(item, f"{field}[]", row)

    for row, values in enumerate(rows):
        for key, value in values.items():
            walk(value, key, row)


def _json_rows(text: str) -> list[dict] | None:
    """The rows of JSON lines or a JSON array of objects; None when the text is neither."""
    try:
        whole = json.loads(text)
        rows = whole if isinstance(whole, list) else [whole]
    except json.JSONDecodeError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            return None
    return rows if all(isinstance(row, dict) for row in rows) else None


def _raise_json_error(file: Path) -> None:
    """Raise a DataError naming the line of `file` that is not valid JSON rows; return if it looks valid."""
    text = file.read_text(encoding="utf-8-sig", errors="replace")  # a byte-order mark is no broken line
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as whole_error:
        if text.lstrip().startswith("["):  # a JSON array: the decoder's position is the broken spot
            raise DataError(
                f"{file}:{whole_error.lineno}: not valid JSON ({whole_error.msg}, column {whole_error.colno})."
            ) from None
    else:
        if isinstance(whole, list):
            for position, row in enumerate(whole):
                if not isinstance(row, dict):
                    raise DataError(f"{file}: item {position} of the top-level list is not an object ({row!r:.60}).")
            return
        if not isinstance(whole, dict):
            raise DataError(f"{file}: expected JSON lines or a list of objects, got a {type(whole).__name__}.")
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{file}:{line_number}: not valid JSON ({error.msg}, column {error.colno}).") from None
        if not isinstance(row, dict):
            raise DataError(f"{file}:{line_number}: each line must be a JSON object, got {row!r:.60}.")


# ---------------------------------------------------------------------------------------------------- Hub


def _hub_split_loaders(name: str, config: str | None) -> dict:
    from datasets import load_dataset
    from datasets.exceptions import DatasetNotFoundError

    not_local = f"(there is no local file or folder '{name}' either)"
    try:
        loaded = load_dataset(name, config)
    except DatasetNotFoundError as error:
        raise DataError(
            f"Dataset '{name}' was not found on the Hub {not_local}: {error}. Check the id, log in for private "
            "datasets, or pass a local file or folder."
        ) from None
    except Exception as error:
        # huggingface_hub / requests / httpx each have their own connection errors; recognise them by name.
        kind = type(error).__name__
        if isinstance(error, ConnectionError) or any(word in kind for word in ("Connect", "Timeout", "Offline")):
            raise DataError(
                f"Could not reach the Hugging Face Hub for dataset '{name}' (offline? {kind}: {error}) {not_local}. "
                "Pass a local file or folder to --dataset_name instead (e.g. a .jsonl file, or a folder with "
                "train.jsonl and test.jsonl)."
            ) from None
        if isinstance(error, ValueError):  # e.g. an unknown configuration name, listing the available ones
            raise DataError(f"Dataset '{name}': {error}") from None
        raise DataError(f"Could not load Hub dataset '{name}': {kind}: {error}") from None
    return {split: (lambda split=split: loaded[split]) for split in loaded}
