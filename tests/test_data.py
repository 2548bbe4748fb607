"""Dataset loading: round trips with custom keys, and errors that name file, row and key."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rl.data import DataError, load_rows

ROWS = [
    {"question": "What is 2 + 3?", "solution": "5"},
    {"question": "Half of 9?", "solution": 4.5},
    {"question": "Natalia sold 48 clips...", "solution": 72},
]
EXPECTED = [
    {"prompt": "What is 2 + 3?", "answer": "5"},
    {"prompt": "Half of 9?", "answer": "4.5"},
    {"prompt": "Natalia sold 48 clips...", "answer": "72"},
]


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_round_trip_with_blank_lines(tmp_path):
    lines = [json.dumps(ROWS[0]), "", json.dumps(ROWS[1]), "   ", json.dumps(ROWS[2])]
    path = _write_jsonl(tmp_path / "train.jsonl", lines)
    assert load_rows(path, "question", "solution") == EXPECTED


def test_parquet_round_trip(tmp_path):
    path = str(tmp_path / "train.parquet")
    table = pa.table({
        "question": [r["question"] for r in ROWS],
        "solution": ["5", "4.5", "72"],
        "extra": [1, 2, 3],
    })
    pq.write_table(table, path)
    assert load_rows(path, "question", "solution") == EXPECTED
    pq.write_table(pa.table({"q": ["a", "b"], "a": [1, 2]}), path)
    assert load_rows(path, "q", "a") == [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]


@pytest.mark.parametrize("bad_line, key, detail", [
    ('{"question": "What is 1+1?", "solution": ', "question", "invalid JSON"),
    ('{"question": "What is 1+1?"}', "solution", "missing key"),
    ('{"question": 11, "solution": "2"}', "question", "must be a string"),
    ('{"question": "What is 1+1?", "solution": null}', "solution", "must be a string or a finite number"),
    ('{"question": "What is 1+1?", "solution": true}', "solution", "must be a string or a finite number"),
    ('["What is 1+1?", "2"]', "question", "expected an object"),
])
def test_jsonl_bad_row_names_file_line_and_key(tmp_path, bad_line, key, detail):
    # The bad row is on line 4: a blank line counts, as an editor would show it.
    lines = [json.dumps(ROWS[0]), "", json.dumps(ROWS[1]), bad_line, json.dumps(ROWS[2])]
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_rows(path, "question", "solution")
    message = str(info.value)
    assert "bad.jsonl" in message
    assert "line 4" in message
    assert repr(key) in message
    assert detail in message


def test_parquet_bad_rows_name_file_row_index_and_key(tmp_path):
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"q": ["a", "b", None], "a": ["1", "2", "3"]}), path)
    with pytest.raises(DataError, match=r"bad\.parquet: row index 2 \(0-based\): key 'q' must be a string"):
        load_rows(path, "q", "a")
    with pytest.raises(DataError, match=r"bad\.parquet: no column 'answer'"):
        load_rows(path, "q", "answer")


def test_unknown_extension_corrupt_and_empty_files(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("q,a\n1,2\n")
    with pytest.raises(DataError, match="train.csv"):
        load_rows(str(path), "q", "a")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="corrupt.parquet: not a readable parquet file"):
        load_rows(str(corrupt), "q", "a")
    empty = _write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        load_rows(empty, "q", "a")


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)
