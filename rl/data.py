"""Prompt/answer datasets loaded from files and Hugging Face `datasets` folders.

`load_rows` reads a `.jsonl` or `.parquet` file, or a local `datasets` folder, into rows
`{"prompt": str, "answer": str, **the record's other fields}`, whatever the source's column
names are (the reward function gets the row as its sample). Every row is checked when the
data is loaded, so a bad row fails the run before any sampling, with a message that names
the file, the row and the key, instead of surfacing as a KeyError deep inside a training
step. With `on_bad_row="skip"` such rows are left out instead, and returned with their
reasons so that the caller counts and logs them.

Folders: one written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (read with
`datasets.load_from_disk`, the split chosen by `split` for a DatasetDict), or a downloaded
dataset snapshot whose files for the split are named `<split>.parquet` / `<split>.jsonl`, or
the split's name and a separator (`-._ ` or a digit) first, anywhere below it
(`data/train-00000-of-00001.parquet`; `train` does not read `training_notes.jsonl`).
Hidden files and folders (`.cache/`, `.git/`) are not data; a split found in both formats is read from its parquet files alone
(`_split_files` says why), with a warning naming the jsonl files left out.

Row numbers in messages: jsonl rows are 1-based *line numbers* (what an editor shows, blank
lines included); parquet and datasets rows are 0-based *row indices* (what pyarrow, pandas
and datasets show). Each message says which of the two it is.

Light module: stdlib only; pyarrow and datasets are imported only when they are needed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["DataError", "load_rows"]

READ_BATCH = 2_000  # records read, converted and checked (tokenized) at a time


log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset that cannot be used as it is: bad extension, bad row, missing key."""


def load_rows(path: str, prompt_key: str, answer_key: str, split: str = "train",
              on_bad_row: str = "error", check: Callable[[list[dict]], list[str | None]] | None = None,
              limit: int = 0) -> tuple[list[dict], list[str]]:
    """Rows of a `.jsonl` / `.parquet` file or a datasets folder, and the reasons of skipped rows.

    `prompt_key` / `answer_key` name the source fields. Prompts must be non-empty strings;
    answers non-empty strings, ints or floats (numbers become their `str`, e.g. GSM8K-style
    integer answers). `check(rows)`, called on batches of the rows that pass these, returns for
    each row None or what is wrong with it (a prompt too long for the model): the message gets
    the file and row, and the row is skipped like any other bad row. Raises DataError for an
    unknown extension, a missing split, a malformed row (unless on_bad_row is "skip"), a
    missing column, or no rows at all.

    Sources are read in batches of READ_BATCH records, each checked as it comes: memory holds
    the rows kept and one batch, the first bad row stops the load at once, and with `limit`
    (> 0) reading stops after that many good rows.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if os.path.isdir(path) and _saved_by_datasets(path):
        records = _read_saved(path, split, prompt_key, answer_key)
    else:
        files = _split_files(path, split) if os.path.isdir(path) else [path]
        if not files:
            raise DataError(f"{path}: no {split} files in this folder ({split}.parquet, {split}.jsonl, or {split} and "
                            f"then -, _, ., a space or a digit: {split}-00000-of-00001.parquet)")
        records = (record for file in files for record in _read(file, prompt_key, answer_key))
    rows, skipped, made = [], [], []  # made: (where, row) not checked yet

    def bad(error: DataError):
        if on_bad_row == "error":
            raise error
        skipped.append(str(error))

    def checked():  # the rows made so far, checked in one batch (the first bad one raises first)
        if not made:
            return
        problems = check([row for _, row in made]) if check is not None else [None] * len(made)
        for (where, row), problem in zip(made, problems):
            if problem is None:
                rows.append(row)
            else:
                bad(DataError(f"{where}: {problem}"))
        made.clear()

    for where, record in records:
        if limit and len(rows) >= limit:
            break
        try:
            if isinstance(record, DataError):
                raise record
            made.append((where, _make_row(record, where, prompt_key, answer_key)))
        except DataError as e:
            checked()  # the rows before it come first
            bad(e)
        if len(made) >= (min(READ_BATCH, limit - len(rows)) if limit else READ_BATCH):
            checked()
    checked()
    rows = rows[:limit] if limit else rows
    if not rows:
        raise DataError(f"{path}: no rows" + (f" ({len(skipped)} skipped, first: {skipped[0]})" if skipped else ""))
    return rows, skipped


def _saved_by_datasets(path: str) -> bool:
    """A folder written by save_to_disk (rather than a folder of data files)."""
    return (Path(path) / "dataset_dict.json").exists() or (Path(path) / "state.json").exists()


def _split_files(path: str, split: str) -> list[str]:
    """The split's files below a snapshot folder, hidden files and folders left out (a
    `.cache/` holds the hub client's partial downloads and metadata, not data).

    One format per split, parquet first: a snapshot with both holds the same rows twice (a
    dataset's own jsonl beside the hub's parquet conversion), and reading both would train on
    every row twice. Parquet keeps the column types (integer answers stay integers) and is what
    the hub serves. The jsonl files left out are named in a warning, so nothing goes unsaid; a
    split whose jsonl really holds other rows needs its own folder.
    """
    if not split.strip():
        raise DataError(f"{path}: the split name is empty (data.train_split / data.eval_split)")
    # The split's name, then the end of the name or a separator (the hub's convention:
    # train.jsonl, train-00000-of-00001.parquet): "train" does not read training_notes.jsonl.
    pattern = re.compile(rf"{re.escape(split)}([-._ 0-9].*)?")
    root = Path(path)
    found = [p for p in root.rglob("*") if p.suffix in (".parquet", ".jsonl") and pattern.fullmatch(p.stem)
             and p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    parquet = sorted(str(p) for p in found if p.suffix == ".parquet")
    jsonl = sorted(str(p) for p in found if p.suffix == ".jsonl")
    if parquet and jsonl:
        log.warning("%s: split %r is there as parquet and as jsonl: reading the parquet (%s), leaving out %s",
                    path, split, ", ".join(parquet), ", ".join(jsonl))
    return parquet or jsonl


def _read(path: str, prompt_key: str, answer_key: str) -> Iterator[tuple[str, object]]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        return _read_jsonl(path, prompt_key, answer_key)
    if ext == ".parquet":
        return _read_parquet(path, prompt_key, answer_key)
    raise DataError(f"{path}: unknown dataset extension {ext!r}; expected .jsonl, .parquet or a datasets folder")


def _read_jsonl(path: str, prompt_key: str, answer_key: str) -> Iterator[tuple[str, object]]:
    """Each line's record, or the DataError of a line that is not UTF-8 or not JSON (bytes are
    decoded line by line, so that a bad byte is one bad row, named, rather than the whole file)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}: line {line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x}, byte "
                                       f"{e.start + 1} of the line)")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                record = DataError(f"{where}: invalid JSON ({e.msg}); expected an object with keys "
                                   f"{prompt_key!r} and {answer_key!r}")
            yield where, record


def _read_parquet(path: str, prompt_key: str, answer_key: str) -> Iterator[tuple[str, object]]:
    """Each row's record, READ_BATCH rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        source = pq.ParquetFile(path)
        _check_columns(path, source.schema_arrow.names, prompt_key, answer_key)
        batches = source.iter_batches(batch_size=READ_BATCH)
        i = 0
        for batch in batches:
            for record in batch.to_pylist():
                yield f"{path}: row index {i} (0-based)", record
                i += 1
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(f"{path}: not a readable parquet file: {e}") from e


def _read_saved(path: str, split: str, prompt_key: str, answer_key: str) -> Iterator[tuple[str, object]]:
    """A folder written by save_to_disk: a Dataset, or a DatasetDict and the split to read."""
    import datasets

    where, folder = path, path
    listing = Path(path) / "dataset_dict.json"
    if listing.exists():  # a DatasetDict: its one split read alone (another may be empty, or broken)
        try:
            splits = json.loads(listing.read_text())["splits"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{listing}: not a datasets split list ({e.__class__.__name__}: {e})") from None
        if split not in splits:
            raise DataError(f"{path}: no split {split!r} (splits: {sorted(splits)})")
        where, folder = f"{path} [split {split}]", str(Path(path) / split)
    try:
        data = datasets.load_from_disk(folder)
    except IndexError:  # datasets' own error for a split saved with no rows: concatenating no tables
        raise DataError(f"{where}: no rows (the split was saved empty)") from None
    _check_columns(where, data.column_names, prompt_key, answer_key)
    return _saved_records(data, where)


def _saved_records(data, where: str) -> Iterator[tuple[str, object]]:
    i = 0
    for batch in data.iter(batch_size=READ_BATCH):  # a dict of columns
        for values in zip(*batch.values()):
            yield f"{where}: row index {i} (0-based)", dict(zip(batch, values))
            i += 1


def _check_columns(where: str, names: list[str], prompt_key: str, answer_key: str):
    for key in (prompt_key, answer_key):
        if key not in names:
            raise DataError(f"{where}: no column {key!r} (columns: {names})")


def _make_row(record: object, where: str, prompt_key: str, answer_key: str) -> dict:
    """Validate one source record; `where` names the file and row for error messages."""
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected an object with keys {prompt_key!r} and {answer_key!r}, "
            f"got {type(record).__name__}"
        )
    for key in (prompt_key, answer_key):
        if key not in record:
            raise DataError(f"{where}: missing key {key!r}")
    prompt = record[prompt_key]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: key {prompt_key!r} must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise DataError(f"{where}: key {prompt_key!r} is empty (no problem to solve)")
    return {**record, "prompt": prompt, "answer": _answer_str(record[answer_key], where, answer_key)}


def _answer_str(value: object, where: str, key: str) -> str:
    # bool is an int subclass, but True/False as a math answer is a data bug, not a number.
    if isinstance(value, str):
        if not value.strip():  # every grade of the row would fail (no completion can match nothing)
            raise DataError(f"{where}: key {key!r} is empty (a gold answer is needed to grade the row)")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(value)
    raise DataError(
        f"{where}: key {key!r} must be a string or a finite number, got {type(value).__name__} {value!r}"
    )
