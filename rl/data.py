"""Prompt/answer datasets loaded from files.

`load_rows` reads a `.jsonl` or `.parquet` file into `[{"prompt": str, "answer": str}]`,
whatever the source's column names are. Every row is checked when the file is loaded, so a
bad row fails the run before any sampling, with a message that names the file, the row and
the key, instead of surfacing as a KeyError deep inside a training step.

Row numbers in messages: jsonl rows are 1-based *line numbers* (what an editor shows, blank
lines included); parquet rows are 0-based *row indices* (what pyarrow and pandas show). Each
message says which of the two it is.

Light module: stdlib only; pyarrow is imported only when a parquet file is read.
"""

from __future__ import annotations

import json
import math
import os

__all__ = ["DataError", "load_rows"]


class DataError(ValueError):
    """A dataset file that cannot be used as it is: bad extension, bad row, missing key."""


def load_rows(path: str, prompt_key: str, answer_key: str) -> list[dict]:
    """Load `[{"prompt": str, "answer": str}, ...]` from a `.jsonl` or `.parquet` file.

    `prompt_key` / `answer_key` name the source fields. Prompts must be strings; answers may be
    strings, ints or floats (numbers become their `str`, e.g. GSM8K-style integer answers).
    Raises DataError for an unknown extension, a malformed row, a missing key, a wrong type,
    or a file with no rows.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        rows = _load_jsonl(path, prompt_key, answer_key)
    elif ext == ".parquet":
        rows = _load_parquet(path, prompt_key, answer_key)
    else:
        raise DataError(f"{path}: unknown dataset extension {ext!r}; expected .jsonl or .parquet")
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _load_jsonl(path: str, prompt_key: str, answer_key: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: invalid JSON ({e.msg}); expected an object with keys "
                    f"{prompt_key!r} and {answer_key!r}"
                ) from None
            rows.append(_make_row(record, where, prompt_key, answer_key))
    return rows


def _load_parquet(path: str, prompt_key: str, answer_key: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        for key in (prompt_key, answer_key):
            if key not in names:
                raise DataError(f"{path}: no column {key!r} (columns: {names})")
        table = pq.read_table(path, columns=[prompt_key, answer_key])
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(f"{path}: not a readable parquet file: {e}") from e
    return [
        _make_row(record, f"{path}: row index {i} (0-based)", prompt_key, answer_key)
        for i, record in enumerate(table.to_pylist())
    ]


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
    return {"prompt": prompt, "answer": _answer_str(record[answer_key], where, answer_key)}


def _answer_str(value: object, where: str, key: str) -> str:
    # bool is an int subclass, but True/False as a math answer is a data bug, not a number.
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(value)
    raise DataError(
        f"{where}: key {key!r} must be a string or a finite number, got {type(value).__name__} {value!r}"
    )
