"""Reading benchmark files and predictions, with one-line errors for bad input.

Benchmark files (`read_rows`, by suffix):
  * `.tsv`: VLMEvalKit's benchmark TSVs (MMBench, SEED, MME, POPE, MMMU, TextVQA ...): a header row with `index`,
    `question`, `answer`, the option columns `A`..`H` (multiple choice), `category`, `l2-category`, `hint`, and
    `image` (base64, tens of kB a cell: hence `csv.field_size_limit`). Scoring never decodes `image`.
  * `.csv`: comma-separated with a header (DPG-Bench's `dpg_bench.csv`).
  * `.jsonl`: one JSON object a line (GenEval's `evaluation_metadata.jsonl`; VQAv2/GQA rows as
    `{"index", "question", "answers"|"answer"}`).
  * `.json`: a list of such objects.
Every row is a dict of column -> value; TSV/CSV cells are strings ("" for an empty cell, as pandas' NaN).

Predictions (`read_records` / `predictions_by_index`): JSONL, one `{"index": ..., "prediction": "..."}` a line for the
understanding suites; the generation suites read their own record shapes (see geneval.py, dpg.py).

An index is compared as text (`index_key`): 12, "12" and 12.0 are one question.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any, Iterable, Mapping, Sequence

OPTION_LETTERS = "ABCDEFGH"  # the option columns of VLMEvalKit's multiple-choice TSVs
# The cells pandas' read_csv / read_excel read as NaN by default (pandas 2.x `STR_NA_VALUES`; "None" since 2.0), the
# way VLMEvalKit reads benchmark TSVs and prediction sheets (vlmeval/smp/file.py `load`).
PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


class InputError(ValueError):
    """Bad input a user can fix (a missing file or column, a malformed line); its message is one line."""


class MissingColumnError(InputError):
    """A benchmark file lacks a column the suite needs."""


class UnknownIndexError(InputError):
    """A prediction names an index that the benchmark file does not have."""


def as_path(path: str | os.PathLike):
    """A user path as an etils `epath.Path` (local or gs://), relative paths against the current directory."""
    from etils import epath

    text = os.fspath(path)
    if "://" not in text and not os.path.isabs(text):
        text = os.path.join(os.getcwd(), text)
    return epath.Path(text)


def _open_text(path):
    path = as_path(path)
    if not path.exists():
        raise InputError(f"no such file: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a file")
    if "://" not in os.fspath(path):  # local: csv wants newline="" (quoted cells may hold line breaks)
        return path, open(os.fspath(path), "r", encoding="utf-8", newline="")
    import io

    return path, io.StringIO(path.read_text(encoding="utf-8"), newline="")


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a benchmark file (.tsv, .csv, .jsonl or .json), each a dict of column -> value."""
    name = os.fspath(path).lower()
    if name.endswith((".tsv", ".csv")):
        return read_delimited(path, "\t" if name.endswith(".tsv") else ",")
    if name.endswith(".jsonl"):
        return read_records(path)
    if name.endswith(".json"):
        path, f = _open_text(path)
        with f:
            try:
                rows = json.load(f)
            except ValueError as e:
                raise InputError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise InputError(f"{path} must hold a JSON list of objects")
        return rows
    raise InputError(f"{path}: unknown benchmark file type (expected .tsv, .csv, .jsonl or .json)")


def read_delimited(path: str | os.PathLike, delimiter: str) -> list[dict[str, str]]:
    """A header-first TSV/CSV as dicts. The field limit is raised: VLMEvalKit's base64 `image` cells exceed csv's
    128 kB default."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    path, f = _open_text(path)
    with f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(f"{path} is empty") from None
        except csv.Error as e:
            raise InputError(f"{path}: {e}") from None
        header = [h.lstrip("\ufeff").strip() for h in header]
        rows = []
        try:
            for line_no, cells in enumerate(reader, start=2):
                if not cells:
                    continue
                if len(cells) != len(header):
                    raise InputError(f"{path}:{line_no}: {len(cells)} fields, the header has {len(header)}")
                rows.append(dict(zip(header, cells)))
        except csv.Error as e:
            raise InputError(f"{path}: {e}") from None
    return rows


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A JSONL file: one JSON object a line (blank lines skipped)."""
    path, f = _open_text(path)
    records = []
    with f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path}:{line_no}: not a JSON line ({e})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def index_key(value: Any) -> str:
    """An index as text: 12, "12", 12.0 and "12.0" are the same question."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if text.endswith(".0") and text[:-2].lstrip("-").isdigit():
        text = text[:-2]
    return text


def require_columns(rows: Sequence[Mapping[str, Any]], columns: Iterable[str], what: str = "benchmark file"):
    """Raises MissingColumnError naming the first column (of `columns`) that the rows lack."""
    if not rows:
        raise InputError(f"the {what} has no rows")
    for column in columns:
        if column not in rows[0]:
            raise MissingColumnError(f"the {what} has no column {column!r} (it has: {', '.join(rows[0])})")


def predictions_by_index(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """{index: prediction text} from `{"index": ..., "prediction": ...}` records; a duplicate index is an error."""
    out: dict[str, str] = {}
    for n, record in enumerate(records, start=1):
        for field in ("index", "prediction"):
            if field not in record:
                raise MissingColumnError(f"prediction line {n} has no {field!r} field (expected "
                                         f'{{"index": ..., "prediction": ...}})')
        key = index_key(record["index"])
        if key in out:
            raise InputError(f"prediction line {n}: index {key} appears twice")
        prediction = record["prediction"]
        out[key] = "" if prediction is None else str(prediction)
    return out


def join_predictions(rows: Sequence[Mapping[str, Any]], predictions: Mapping[str, str], only_predicted: bool = False
                     ) -> tuple[list[tuple[Mapping[str, Any], str]], int]:
    """[(row, prediction)] in the rows' order, and how many rows had no prediction.

    A prediction whose index is not in the rows is an UnknownIndexError (predictions of another benchmark, most
    likely). A row without a prediction is scored with an empty answer (wrong, as an unparsable answer is in the
    official scorers), or left out with `only_predicted`."""
    require_columns(rows, ["index"])
    keys = [index_key(r["index"]) for r in rows]
    known = set(keys)
    for key in predictions:
        if key not in known:
            raise UnknownIndexError(f"prediction index {key} is not in the benchmark file")
    pairs, missing = [], 0
    for key, row in zip(keys, rows):
        if key in predictions:
            pairs.append((row, predictions[key]))
        else:
            missing += 1
            if not only_predicted:
                pairs.append((row, ""))
    if not pairs:
        raise InputError("no benchmark row has a prediction")
    return pairs, missing


def parse_list(value: Any) -> list[str]:
    """A list-valued cell as a list of strings: a JSON/Python list, VLMEvalKit's "['a', 'b']" text, or one answer."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        import ast

        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, (list, tuple)):
            return [str(v) for v in parsed]
    return [text]


def present_options(row: Mapping[str, Any], letters: str = OPTION_LETTERS,
                    na: frozenset[str] | None = None) -> dict[str, str]:
    """{letter: option text} for the option columns (A..H) that hold text (VLMEvalKit's `build_choices`: a NaN cell
    is no option). `na`: the cell texts that are NaN (PANDAS_NA as VLMEvalKit reads a TSV); None: an empty or
    "nan" cell only."""
    out = {}
    for letter in letters:
        value = row.get(letter)
        if value is None:
            continue
        text = str(value)
        if na is not None:
            if text in na:
                continue
        elif text.strip() == "" or text.strip().lower() == "nan":
            continue
        out[letter] = text
    return out
