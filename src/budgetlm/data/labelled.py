"""Labelled examples for classification: read and write .tsv/.csv/.jsonl/.parquet tables, find the
text and label columns, map labels to class indices, and split off a stratified validation set.

Every command finds the columns by one rule (`find_columns`): the ones named, else `text` and `label`
(the Hugging Face convention), else the only text-like column and the only other one. A table without
a header row (`header=False`, the flag --no-header) has its columns named by position: "0", "1", ..."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from budgetlm.data.sources import read_jsonl, read_table
from budgetlm.errors import UserError, names

LABELLED_SUFFIXES = (".tsv", ".csv", ".jsonl", ".parquet")


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in LABELLED_SUFFIXES:
        raise UserError(f"{path}: labelled data must be a {', '.join(LABELLED_SUFFIXES)} file")
    return suffix


def read_rows(path: str | Path, header: bool = True) -> tuple[list[str], list[dict]]:
    """Column names and rows of a labelled table. TSV is read with quotes as literal text (GLUE style).
    Without a header row (CSV/TSV only) the columns are named by position: "0", "1", ..."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; check the path")
    suffix = _suffix(path)
    if not header and suffix not in (".csv", ".tsv"):
        raise UserError(f"{path}: --no-header is for .csv and .tsv files; a {suffix} file names its fields")
    try:
        if suffix == ".jsonl":
            return read_jsonl(path)
        columns, rows = read_table(path) if header else _read_headerless(path)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; convert it to UTF-8") from None
    except csv.Error as e:
        raise UserError(f"{path}: not a readable {suffix[1:].upper()} table ({e})") from None
    for k, row in enumerate(rows, 1):
        if None in row:  # csv.DictReader files surplus fields under the key None
            raise UserError(f"{path}: row {k} has more fields than the header ({len(columns)})")
    return columns, rows


def _read_headerless(path: Path) -> tuple[list[str], list[dict]]:
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8-sig", newline="") as f:
        if path.suffix.lower() == ".tsv":
            lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        else:
            lines = list(csv.reader(f))
    lines = [line for line in lines if line]
    width = max((len(line) for line in lines), default=0)
    columns = [str(i) for i in range(width)]
    return columns, [dict(zip(columns, line)) for line in lines]


def _text_like(columns: list[str], rows: list[dict], leave_out: str | None) -> list[str]:
    """The columns that look like text: strings, not numbers, mostly of several words; where none is,
    those whose values mostly differ from each other (labels repeat a few values)."""
    sample = rows[:1000]
    strings = {}
    for c in columns:
        values = [r.get(c) for r in sample if r.get(c) not in (None, "")]
        if c != leave_out and values and all(isinstance(v, str) for v in values) and \
                not all(_number(v) is not None for v in values):
            strings[c] = values
    worded = [c for c, values in strings.items() if sum(len(v.split()) > 1 for v in values) >= len(values) / 2]
    return worded or [c for c, values in strings.items() if len(set(values)) > len(values) / 2]


def find_columns(path: str | Path, columns: list[str], rows: list[dict], text_column: str | None = None,
                 label_column: str | None = None, header: bool = True) -> tuple[str, str]:
    """(text column, label column): those given, else `text` and `label`, else the only text-like column
    and the only other one; one line naming the columns found when the choice is not clear. A header
    whose label cell is one of the labels below it is a first example: that asks for --no-header."""
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column is not None and column not in columns:
            raise UserError(f"{path}: no column {column!r} (columns: {names(columns)}); choose one with {flag}"
                            + ("" if header else " (without a header, columns are named by position: 0, 1, ...)"))
    text = text_column
    if text is None:
        if "text" in columns and label_column != "text":
            text = "text"
        else:
            textual = _text_like(columns, rows, label_column)
            if len(textual) != 1:
                raise UserError(f"{path}: cannot tell which column holds the text (columns: {names(columns)}); "
                                "choose one with --text-column" + _headerless_hint(path, header, columns))
            text = textual[0]
    label = label_column
    if label is None:
        others = [c for c in columns if c != text]
        if "label" in others:
            label = "label"
        elif len(others) == 1:
            label = others[0]
        else:
            raise UserError(f"{path}: cannot tell which column holds the label (columns: {names(columns)}); "
                            "choose one with --label-column" + _headerless_hint(path, header, columns))
    if header and label in {label_text(r.get(label)) for r in rows if r.get(label) is not None}:
        raise UserError(f"{path}: the first row looks like an example, not a header (its label {label!r} occurs "
                        "below it); for a table without a header give --no-header (columns are then 0, 1, ...: "
                        "--text-column 0 --label-column 1)")
    return text, label


def _headerless_hint(path, header: bool, columns: list[str]) -> str:
    if header and Path(path).suffix.lower() in (".csv", ".tsv") and any(len(str(c).split()) > 3 for c in columns):
        return "; if the first row is an example, give --no-header"
    return ""


def label_text(value) -> str:
    """The text a label is compared by: a JSON or parquet 1 and a CSV "1" are the same class."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return str(value)


def labelled_from_rows(path: str | Path, columns: list[str], rows: list[dict], text_column: str,
                       label_column: str) -> tuple[list[str], list[str], dict[str, object]]:
    """(texts, labels as text, the labels written as numbers or booleans by their text) from rows
    read by `read_rows`, one per row, with every check applied."""
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column not in columns:
            raise UserError(f"{path}: no column {column!r} (columns: {names(columns)}); "
                            f"choose one with {flag}")
    if not rows:
        raise UserError(f"{path}: holds no rows")
    texts, labels, written = [], [], {}
    for k, row in enumerate(rows, 1):
        text, label = row.get(text_column), row.get(label_column)
        if text is None:
            raise UserError(f"{path}: row {k} has no value in column {text_column!r}")
        if label is None or label_text(label) == "":
            raise UserError(f"{path}: row {k} has an empty label in column {label_column!r}; "
                            "every example needs a label")
        texts.append(str(text))
        labels.append(label_text(label))
        if not isinstance(label, str):
            written.setdefault(labels[-1], label)
    if len(set(labels)) < 2:
        raise UserError(f"{path}: every label is {labels[0]!r}; classification needs at least two classes "
                        f"(is {label_column!r} the right --label-column?)")
    return texts, labels, written


def load_labelled(path: str | Path, text_column: str | None = None, label_column: str | None = None,
                  header: bool = True) -> tuple[list[str], list[str], dict[str, object]]:
    """(texts, labels as text, labels written as numbers or booleans) from a .tsv, .csv, .jsonl or
    .parquet file, its columns found by `find_columns`."""
    columns, rows = read_rows(path, header)
    if not rows:
        raise UserError(f"{path}: holds no rows")
    text_column, label_column = find_columns(path, columns, rows, text_column, label_column, header)
    return labelled_from_rows(path, columns, rows, text_column, label_column)


def labelled_columns(path: str | Path, text_column: str | None = None, label_column: str | None = None,
                     header: bool = True) -> tuple[str, str]:
    """The (text, label) columns `load_labelled` reads from `path`."""
    columns, rows = read_rows(path, header)
    if not rows:
        raise UserError(f"{path}: holds no rows")
    return find_columns(path, columns, rows, text_column, label_column, header)


def find_text_column(path: str | Path, columns: list[str], rows: list[dict], text_column: str | None = None,
                     trained_on: str | None = None) -> str:
    """The text column of an unlabelled table: the one given, else the training data's, else `text`,
    else the only text-like column."""
    if text_column is not None:
        if text_column not in columns:
            raise UserError(f"{path}: no column {text_column!r} (columns: {names(columns)}); "
                            "choose one with --text-column")
        return text_column
    for name in (trained_on, "text"):
        if name in columns:
            return name
    textual = _text_like(columns, rows, None)
    if len(textual) != 1:
        raise UserError(f"{path}: cannot tell which column holds the text (columns: {names(columns)}); "
                        "choose one with --text-column")
    return textual[0]


def write_rows(path: str | Path, columns: list[str], rows: list[dict], header: bool = True) -> None:
    """Write rows in the format `path`'s suffix names, columns in the given order (CSV/TSV without a
    header row when `header` is false)."""
    path = Path(path)
    suffix = _suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{path}: writing parquet needs pyarrow: pip install pyarrow") from None
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with path.open("w", encoding="utf-8", newline="") as f:
            if suffix == ".tsv":  # GLUE style: quotes are literal text, so nothing is quoted or escaped
                writer = csv.DictWriter(f, columns, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None,
                                        lineterminator="\n")
            else:
                writer = csv.DictWriter(f, columns, lineterminator="\n")
            if header:
                writer.writeheader()
            try:
                writer.writerows(rows)
            except csv.Error:  # QUOTE_NONE cannot write a tab or newline inside a field
                raise UserError(f"{path}: a value holds a tab or line break, which TSV cannot hold; "
                                "write .csv or .jsonl instead") from None


def _number(label: str) -> float | None:
    try:
        return float(label)
    except ValueError:
        return None


@dataclass(frozen=True)
class LabelMap:
    """Labels (as text) ↔ class indices. Sorted, numerically when every label looks like a number,
    so "2" < "10" and a 0/1 dataset keeps 0 → 0 and 1 → 1. `written` holds each label as the data
    wrote it where some were numbers or booleans (JSON, parquet), so predictions can give them back
    in kind; empty when every label was text."""

    labels: tuple[str, ...]
    written: tuple = ()

    @classmethod
    def from_labels(cls, labels: list[str], written: dict[str, object] | None = None) -> LabelMap:
        distinct = set(labels)
        numbers = {label: _number(label) for label in distinct}
        if all(v is not None for v in numbers.values()):
            ordered = tuple(sorted(distinct, key=lambda label: (numbers[label], label)))
        else:
            ordered = tuple(sorted(distinct))
        return cls(ordered, tuple(written.get(label, label) for label in ordered) if written else ())

    def __len__(self) -> int:
        return len(self.labels)

    def encode(self, labels: list[str], source: str = "the data") -> list[int]:
        index = {label: i for i, label in enumerate(self.labels)}
        unknown = sorted(set(labels) - index.keys())
        if unknown:
            raise UserError(f"{source}: label(s) {', '.join(map(repr, unknown[:5]))} never occur in the training "
                            f"data (its labels: {', '.join(self.labels)})")
        return [index[label] for label in labels]


def stratified_split(texts: list[str], labels: list[str], fraction: float,
                     seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices), sorted. Each class gives `fraction` of its examples to
    validation, at least one when it has two or more, and always keeps one for training.
    Written here because scikit-learn's stratified splits refuse classes with a single example."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if not 0 < fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    train, val = [], []
    for label in sorted(by_class):  # a fixed class order keeps the RNG draws reproducible
        members = np.array(by_class[label])
        rng.shuffle(members)
        k = min(max(1, round(fraction * len(members))), len(members) - 1)
        val.extend(members[:k].tolist())
        train.extend(members[k:].tolist())
    if not val:
        raise UserError("too few examples to split off a validation set (each class has one); give --val")
    return sorted(train), sorted(val)


def load_split(data: str | None, val: str | None, text_column: str | None, label_column: str | None,
               val_fraction: float, split_seed: int, header: bool = True
               ) -> tuple[list[str], list[str], list[str], list[str], dict[str, object]]:
    """(train texts, train labels, validation texts, validation labels, the training labels written as
    numbers or booleans), labels as text: `val` when given, else a stratified share of `data`."""
    if not data:
        raise UserError("give the labelled training data with --data (a .tsv, .csv, .jsonl or .parquet file)")
    texts, labels, written = load_labelled(data, text_column, label_column, header)
    if val:
        val_texts, val_labels, _ = load_labelled(val, text_column, label_column, header)
        return texts, labels, val_texts, val_labels, written
    train_idx, val_idx = stratified_split(texts, labels, val_fraction, split_seed)

    def pick(xs: list, idx) -> list:
        return [xs[i] for i in idx]
    return pick(texts, train_idx), pick(labels, train_idx), pick(texts, val_idx), pick(labels, val_idx), written
