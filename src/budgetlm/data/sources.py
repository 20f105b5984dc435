"""Read text corpora from files, folders, globs, tables and Hugging Face datasets into documents,
and split off a deterministic validation tail."""

from __future__ import annotations

import csv
import glob
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from budgetlm.errors import UserError, names

TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")


@dataclass
class Corpus:
    documents: list[str]
    skipped: list[str]  # files left out as binary or not UTF-8

    @property
    def n_bytes(self) -> int:
        return sum(len(d.encode("utf-8")) for d in self.documents)


def _decode(path: Path) -> str | None:
    """The file's text, or None when it is binary or not UTF-8."""
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        return None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def read_jsonl(path: Path) -> tuple[list[str], list[dict]]:
    """Keys (in first-seen order) and records of a JSON-lines file; blank lines are skipped."""
    columns: dict[str, None] = {}
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{n}: each line must be a JSON object, not {type(record).__name__}")
            columns.update(dict.fromkeys(record))
            rows.append(record)
    return list(columns), rows


def _read_jsonl_texts(path: Path, field: str) -> list[str]:
    _, rows = read_jsonl(path)
    for n, record in enumerate(rows, 1):
        if field not in record:
            raise UserError(f"{path}: record {n} has no field {field!r}; choose the text field with --text-field")
    return [str(record[field]) for record in rows]


def _column(path: Path, rows: list[dict], columns: list[str], column: str | None) -> list[str]:
    if column is None:
        if len(columns) != 1:
            raise UserError(f"{path}: has columns {columns}; choose the text with --text-column")
        column = columns[0]
    if column not in columns:
        raise UserError(f"{path}: no column {column!r} (columns: {names(columns)}); choose one with --text-column")
    return [str(r[column]) for r in rows if r[column] not in (None, "")]


def read_table(path: Path) -> tuple[list[str], list[dict]]:
    """Column names and rows of a .csv, .tsv or .parquet file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
        table = pq.read_table(path)
        return table.column_names, table.to_pylist()
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as f:
        if path.suffix == ".tsv":
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _read_hf_dataset(name: str, text_column: str | None) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{name}: no such file or folder (to read it as a Hugging Face dataset, "
                        "pip install datasets)") from None
    try:
        if Path(name).is_dir():
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name)
    except Exception as e:  # datasets raises many kinds; the user needs the message, not the type
        raise UserError(f"{name}: could not load as a Hugging Face dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    column = text_column or ("text" if "text" in ds.column_names else None)
    if column not in ds.column_names:
        raise UserError(f"{name}: no column {column!r} (columns: {names(ds.column_names)}); use --text-column")
    return [t for t in ds[column] if t]


def expand(spec: str) -> list[Path]:
    """The files a path, folder (recursively) or glob names, sorted for a deterministic order."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + TABLE_SUFFIXES)
    if any(ch in spec for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    return []


def load_corpus(specs: list[str], *, text_field: str = "text", text_column: str | None = None) -> Corpus:
    """Documents from every source in `specs`; binary or non-UTF-8 files are skipped and counted."""
    documents, skipped = [], []
    for spec in specs:
        if _is_saved_hf_dataset(Path(spec)) or (not Path(spec).exists() and _looks_like_hub_name(spec)):
            documents.extend(_read_hf_dataset(spec, text_column))
            continue
        files = expand(spec)
        if not files:
            if Path(spec).is_dir():
                raise UserError(f"{spec}: folder holds no .txt, .md, .jsonl, .csv, .tsv or .parquet files")
            raise UserError(f"{spec}: no such file, folder or glob match; check the --data path")
        for path in files:
            suffix = path.suffix.lower()
            try:
                if suffix == ".jsonl":
                    documents.extend(_read_jsonl_texts(path, text_field))
                elif suffix in (".csv", ".tsv", ".parquet"):
                    columns, rows = read_table(path)
                    documents.extend(_column(path, rows, columns, text_column))
                elif (text := _decode(path)) is None:
                    skipped.append(str(path))
                elif text.strip():
                    documents.append(text)
            except UnicodeDecodeError:
                skipped.append(str(path))
    if skipped:
        print(f"warning: skipped {len(skipped)} file(s) that are binary or not UTF-8, e.g. {skipped[0]}", file=sys.stderr)
    documents = [d for d in documents if d.strip()]
    if not documents:
        what = "every file was binary or not UTF-8" if skipped else "it holds no text"
        raise UserError(f"the corpus is empty: {what} ({', '.join(specs)})")
    return Corpus(documents, skipped)


def _looks_like_hub_name(spec: str) -> bool:
    """`name` or `owner/name` without a file suffix, as Hugging Face dataset ids are written."""
    parts = spec.split("/")
    return (1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts)
            and not any(ch in spec for ch in "*?[") and Path(spec).suffix == "")


def _is_saved_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def split_validation(documents: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation). One document: its last `fraction` of bytes, cut at a line boundary.
    Several: whole documents from the tail until they hold `fraction` of the bytes."""
    if not 0 < fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, got {fraction}")
    if len(documents) == 1:
        raw = documents[0].encode("utf-8")
        cut = int(len(raw) * (1 - fraction))
        newline = raw.rfind(b"\n", 0, cut)
        cut = newline + 1 if newline > 0 else cut
        while cut < len(raw) and (raw[cut] & 0xC0) == 0x80:  # never split a UTF-8 character
            cut += 1
        train, val = raw[:cut].decode("utf-8"), raw[cut:].decode("utf-8")
        if not train.strip() or not val.strip():
            raise UserError("the corpus is too small to split off a validation part; give more text or --val")
        return [train], [val]
    sizes = [len(d.encode("utf-8")) for d in documents]
    target, held, k = fraction * sum(sizes), 0, len(documents)
    while k > 1 and held < target:
        k -= 1
        held += sizes[k]
    return documents[:k], documents[k:]
