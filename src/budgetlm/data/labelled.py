"""Labelled examples for classification: read and write .tsv/.csv/.jsonl/.parquet tables, map labels
to class indices, and split off a stratified validation set."""

from __future__ import annotations

import csv
import json
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


def read_rows(path: str | Path) -> tuple[list[str], list[dict]]:
    """Column names and rows of a labelled table. TSV is read with quotes as literal text (GLUE style)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; check the path")
    suffix = _suffix(path)
    try:
        if suffix == ".jsonl":
            return read_jsonl(path)
        columns, rows = read_table(path)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; convert it to UTF-8") from None
    except csv.Error as e:
        raise UserError(f"{path}: not a readable {suffix[1:].upper()} table ({e})") from None
    for k, row in enumerate(rows, 1):
        if None in row:  # csv.DictReader files surplus fields under the key None
            raise UserError(f"{path}: row {k} has more fields than the header ({len(columns)})")
    return columns, rows


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


def load_labelled(path: str | Path, text_column: str = "sentence",
                  label_column: str = "label") -> tuple[list[str], list[str], dict[str, object]]:
    """(texts, labels as text, labels written as numbers or booleans) from a .tsv, .csv, .jsonl or
    .parquet file."""
    columns, rows = read_rows(path)
    return labelled_from_rows(path, columns, rows, text_column, label_column)


def write_rows(path: str | Path, columns: list[str], rows: list[dict]) -> None:
    """Write rows in the format `path`'s suffix names, columns in the given order."""
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


def load_split(data: str | None, val: str | None, text_column: str, label_column: str, val_fraction: float,
               split_seed: int) -> tuple[list[str], list[str], list[str], list[str], dict[str, object]]:
    """(train texts, train labels, validation texts, validation labels, the training labels written as
    numbers or booleans), labels as text: `val` when given, else a stratified share of `data`."""
    if not data:
        raise UserError("give the labelled training data with --data (a .tsv, .csv, .jsonl or .parquet file)")
    texts, labels, written = load_labelled(data, text_column, label_column)
    if val:
        val_texts, val_labels, _ = load_labelled(val, text_column, label_column)
        return texts, labels, val_texts, val_labels, written
    train_idx, val_idx = stratified_split(texts, labels, val_fraction, split_seed)

    def pick(xs: list, idx) -> list:
        return [xs[i] for i in idx]
    return pick(texts, train_idx), pick(labels, train_idx), pick(texts, val_idx), pick(labels, val_idx), written
