"""Read text corpora from files, folders, globs, tables and Hugging Face datasets, as a stream of
pieces (`iter_pieces`, memory bounded by a piece, not by the corpus) or as documents (`load_corpus`),
and split off a deterministic validation tail."""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from budgetlm.errors import UserError, names

TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")
PIECE_BYTES = 1 << 20  # a text file is read this much at a time


@dataclass
class Corpus:
    documents: list[str]
    skipped: list[str]  # files left out as binary or not UTF-8

    @property
    def n_bytes(self) -> int:
        return sum(len(d.encode("utf-8")) for d in self.documents)


def _jsonl_records(path: Path) -> Iterator[dict]:
    """The records of a JSON-lines file one by one; blank lines are skipped."""
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
            yield record


def read_jsonl(path: Path) -> tuple[list[str], list[dict]]:
    """Keys (in first-seen order) and records of a JSON-lines file; blank lines are skipped."""
    columns: dict[str, None] = {}
    rows = []
    for record in _jsonl_records(path):
        columns.update(dict.fromkeys(record))
        rows.append(record)
    return list(columns), rows


def _iter_jsonl_texts(path: Path, field: str) -> Iterator[str]:
    for n, record in enumerate(_jsonl_records(path), 1):
        if field not in record:
            raise UserError(f"{path}: record {n} has no field {field!r}; choose the text field with --text-field")
        yield str(record[field])


def _text_column(path: Path, columns: list[str], column: str | None) -> str:
    if column is None:
        if len(columns) != 1:
            raise UserError(f"{path}: has columns {columns}; choose the text with --text-column")
        column = columns[0]
    if column not in columns:
        raise UserError(f"{path}: no column {column!r} (columns: {names(columns)}); choose one with --text-column")
    return column


def _iter_column(path: Path, column: str | None) -> Iterator[str]:
    """The text column of a .csv, .tsv or .parquet file, row by row (parquet: batch by batch)."""
    if path.suffix == ".parquet":
        pq = _pyarrow_parquet(path)
        table = pq.ParquetFile(path)
        column = _text_column(path, table.schema_arrow.names, column)
        for batch in table.iter_batches(columns=[column]):
            yield from (str(v) for v in batch.column(0).to_pylist() if v not in (None, ""))
        return
    with _csv_reader(path) as reader:
        column = _text_column(path, list(reader.fieldnames or []), column)
        yield from (str(r[column]) for r in reader if r[column] not in (None, ""))


def _pyarrow_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    return pq


@contextlib.contextmanager
def _csv_reader(path: Path) -> Iterator[csv.DictReader]:
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as f:
        if path.suffix == ".tsv":
            yield csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            yield csv.DictReader(f)


def read_table(path: Path) -> tuple[list[str], list[dict]]:
    """Column names and rows of a .csv, .tsv or .parquet file."""
    if path.suffix == ".parquet":
        table = _pyarrow_parquet(path).read_table(path)
        return table.column_names, table.to_pylist()
    with _csv_reader(path) as reader:
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _iter_hf_dataset(name: str, text_column: str | None) -> Iterator[str]:
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
    for batch in ds.select_columns([column]).iter(batch_size=1000):  # Arrow-backed: read a batch at a time
        yield from (t for t in batch[column] if t)


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


def iter_pieces(specs: list[str], *, text_field: str = "text", text_column: str | None = None,
                skipped: list[str] | None = None, piece_bytes: int = PIECE_BYTES) -> Iterator[tuple[str, bool]]:
    """(text, starts a document) from every source in `specs`, in order: a table's rows one by one and a
    text file in pieces of about `piece_bytes` (`text_pieces`), so memory stays bounded whatever the
    corpus size. Documents of only whitespace are left out; binary or non-UTF-8 files are appended to
    `skipped`."""
    skipped = [] if skipped is None else skipped
    for spec in specs:
        if _is_saved_hf_dataset(Path(spec)) or (not Path(spec).exists() and _looks_like_hub_name(spec)):
            yield from ((t, True) for t in _iter_hf_dataset(spec, text_column) if t.strip())
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
                    texts = _iter_jsonl_texts(path, text_field)
                elif suffix in (".csv", ".tsv", ".parquet"):
                    texts = _iter_column(path, text_column)
                else:
                    yield from text_pieces(path, skipped, piece_bytes)
                    continue
                yield from ((t, True) for t in texts if t.strip())
            except UnicodeDecodeError:
                skipped.append(str(path))


def text_pieces(path: Path, skipped: list[str], piece_bytes: int = PIECE_BYTES) -> Iterator[tuple[str, bool]]:
    """A text file as one document in pieces of about `piece_bytes`, each cut after a newline between two
    non-space characters (as `tokens.line_pieces` cuts: byte-level BPE gives the same tokens for the pieces as for
    the whole). A file that is binary (a NUL in its first 8 KB) or whose first piece is not UTF-8 is skipped."""
    with path.open("rb") as f:
        carry = f.read(piece_bytes)
        if b"\x00" in carry[:8192]:
            skipped.append(str(path))
            return
        read, pending = 0, ""  # bytes decoded so far; leading whitespace held until the document shows text
        while carry:
            block = f.read(piece_bytes)
            carry += block
            cut = _piece_end(carry, piece_bytes) if block else len(carry)
            if cut is None:
                continue
            raw, carry = carry[:cut], carry[cut:]
            try:
                text = raw.decode("utf-8-sig" if read == 0 else "utf-8")
            except UnicodeDecodeError:
                if read == 0:
                    skipped.append(str(path))
                    return
                raise UserError(f"{path}: not UTF-8 after byte {read}; convert it to UTF-8 or leave it out") from None
            read, starts = read + len(raw), False
            if pending is not None:
                if not text.strip():
                    pending += text
                    continue
                text, pending = pending + text, None
                starts = True
            yield text, starts


def _piece_end(data: bytes, piece_bytes: int) -> int | None:
    """Where to cut `data`: after its last newline between two non-space bytes, else (past eight pieces) after
    its last newline or space; None to read on."""
    end = len(data) - 1
    while (end := data.rfind(b"\n", 1, end)) > 0:
        if not data[end - 1 : end].isspace() and not data[end + 1 : end + 2].isspace():
            return end + 1
    if len(data) > 8 * piece_bytes:
        end = max(data.rfind(b"\n"), data.rfind(b" "))
        return end + 1 if end > 0 else None
    return None


def load_corpus(specs: list[str], *, text_field: str = "text", text_column: str | None = None) -> Corpus:
    """Documents from every source in `specs`; binary or non-UTF-8 files are skipped and counted."""
    documents, skipped = [], []
    for text, starts in iter_pieces(specs, text_field=text_field, text_column=text_column, skipped=skipped):
        if starts:
            documents.append(text)
        else:
            documents[-1] += text
    warn_skipped(skipped)
    if not documents:
        raise UserError(empty_corpus(specs, skipped))
    return Corpus(documents, skipped)


def warn_skipped(skipped: list[str]) -> None:
    if skipped:
        print(f"warning: skipped {len(skipped)} file(s) that are binary or not UTF-8, e.g. {skipped[0]}", file=sys.stderr)


def empty_corpus(specs: list[str], skipped: list[str]) -> str:
    what = "every file was binary or not UTF-8" if skipped else "it holds no text"
    return f"the corpus is empty: {what} ({', '.join(specs)})"


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
