"""A large corpus of text files read in chunks: the training part (all but the last `val_fraction` of the bytes)
is cut into chunks of about a megabyte, visited in one seeded order fixed per corpus; a run encodes the first
chunks of that order until it has the tokens its budget will read, into a token cache that later runs extend
(never re-encode). Validation is the tail, whole where it fits `VAL_SAMPLE_BYTES`, else a fixed, evenly spaced
sample of it. Memory is bounded by a chunk and the tokens, whatever the corpus size."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer

from budgetlm.data.sources import TABLE_SUFFIXES, expand, iter_pieces
from budgetlm.data.tokenizer import eot_id
from budgetlm.data.tokens import cache_dir, encode_texts, token_dtype
from budgetlm.errors import UserError

CHUNK_BYTES = 1 << 18
# Validation is held whole up to VAL_WHOLE_BYTES (the default corpus, tinyshakespeare, WikiText-2: figures stay
# comparable); beyond, it is a sample of VAL_SAMPLE_BYTES in pieces spread evenly over the tail, the same for every
# run on the corpus: small enough that a one-minute run can afford its final evaluation on a busy 2-core CPU.
VAL_WHOLE_BYTES = 1 << 20
VAL_SAMPLE_BYTES = 1 << 18
VAL_PIECE_BYTES = 1 << 14
BOUNDARY_SEARCH = 1 << 20    # how far past a nominal cut a between-words newline is looked for


@dataclass(frozen=True)
class Span:
    file: int
    start: int  # nominal byte offsets; reading moves each to the next cut (`_cut_at`), so adjacent spans tile
    end: int


@dataclass
class ChunkedCorpus:
    files: list[Path]
    sizes: list[int]
    train: list[Span]      # chunks of the training part, in file order
    val: list[Span]        # validation: the whole tail or its sample
    val_whole: bool
    identity: str          # paths, sizes and modification times: a changed file is another corpus

    @property
    def train_bytes(self) -> int:
        return sum(s.end - s.start for s in self.train)

    def order(self) -> np.ndarray:
        """The fixed, seeded order in which runs take training chunks (spread over the whole corpus)."""
        seed = int(self.identity[:16], 16)
        return np.random.default_rng(seed).permutation(len(self.train))

    def read(self, span: Span) -> tuple[str, bool]:
        """(text, starts a document) of a span: each file is one document."""
        path = self.files[span.file]
        with path.open("rb") as f:
            start = _cut_at(f, span.start, self.sizes[span.file])
            end = _cut_at(f, span.end, self.sizes[span.file])
            f.seek(start)
            raw = f.read(max(end - start, 0))
        try:
            return raw.decode("utf-8-sig" if start == 0 else "utf-8"), start == 0
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 near byte {start}; convert it to UTF-8 or leave it out") from None

    def read_many(self, spans: list[Span]) -> Iterator[tuple[str, bool]]:
        """(text, starts a document) of each of `spans`, given in corpus order."""
        return (self.read(span) for span in spans)


@dataclass
class StreamedCorpus(ChunkedCorpus):
    """A large corpus of tables (JSON lines, CSV, TSV, parquet) or mixed files, which cannot be entered at an
    offset: its chunks are the groups of about CHUNK_BYTES that `iter_pieces` yields in order (sized once by a
    pass over the corpus, remembered in the cache), read by passes that keep only the chunks asked for. A span's
    offsets are those of the text stream; a validation span shorter than its chunk keeps its first documents."""

    specs: list[str] = None
    options: dict = None

    def groups(self) -> Iterator[list[tuple[str, bool]]]:
        group, size = [], 0
        for text, starts in iter_pieces(self.specs, **self.options):
            group.append((text, starts))
            size += len(text.encode("utf-8"))
            if size >= CHUNK_BYTES:
                yield group
                group, size = [], 0
        if group:
            yield group

    def read_many(self, spans: list[Span]) -> Iterator[tuple[str, bool]]:
        wanted = {span.start: span for span in spans}
        offset, last = 0, max(wanted, default=-1)
        for group in self.groups():
            if offset > last:
                return
            size = sum(len(t.encode("utf-8")) for t, _ in group)
            if offset in wanted:
                limit, kept = wanted[offset].end - offset, 0
                for text, starts in group:
                    if kept >= limit:
                        break
                    kept += len(text.encode("utf-8"))
                    yield text, starts
            offset += size

    def read(self, span: Span) -> tuple[str, bool]:
        pieces = list(self.read_many([span]))
        return "".join(t for t, _ in pieces), bool(pieces) and pieces[0][1]


def text_files(specs: list[str], skipped: list[str]) -> list[Path] | None:
    """The files `specs` name when all are plain text (random access by offset), else None; binary files (a NUL
    in the first 8 KB) are left out and appended to `skipped`."""
    files: list[Path] = []
    for spec in specs:
        found = expand(spec)
        if not found or any(p.suffix.lower() in TABLE_SUFFIXES for p in found):
            return None
        for path in found:
            with path.open("rb") as f:
                if b"\x00" in f.read(8192):
                    skipped.append(str(path))
                    continue
            files.append(path)
    return files


def corpus_bytes(specs: list[str]) -> int | None:
    """Bytes on disk of the files `specs` name; None for a dataset name or a missing path."""
    files = [p for spec in specs for p in expand(spec)]
    return sum(p.stat().st_size for p in files) if files else None


def chunked(files: list[Path], val_fraction: float) -> ChunkedCorpus:
    sizes = [p.stat().st_size for p in files]
    h = hashlib.sha256()
    for p, size in zip(files, sizes):
        h.update(f"{p.resolve()}\x00{size}\x00{p.stat().st_mtime_ns}\x00".encode())
    total = sum(sizes)
    tail_from = int(total * (1 - val_fraction))
    train, tail, offset = [], [], 0
    for i, size in enumerate(sizes):
        for start in range(0, size, CHUNK_BYTES):
            end = min(start + CHUNK_BYTES, size)
            if offset + end <= tail_from:
                train.append(Span(i, start, end))
            elif offset + start >= tail_from:
                tail.append(Span(i, start, end))
            else:
                cut = tail_from - offset
                train.append(Span(i, start, cut))
                tail.append(Span(i, cut, end))
        offset += size
    tail_bytes = sum(s.end - s.start for s in tail)
    if not train or not tail:
        raise UserError("the corpus is too small to split off a validation part; give more text or --val")
    whole = tail_bytes <= VAL_WHOLE_BYTES
    return ChunkedCorpus(files, sizes, train, tail if whole else _spread(tail, tail_bytes), whole,
                         h.hexdigest()[:24])


def streamed(specs: list[str], val_fraction: float, options: dict) -> StreamedCorpus:
    """A large corpus of tables or mixed files in chunks (`StreamedCorpus`); the first run on it sizes them."""
    files = [p for spec in specs for p in expand(spec)]
    h = hashlib.sha256(json.dumps([specs, options, CHUNK_BYTES]).encode())
    for p in files:
        h.update(f"{p.resolve()}\x00{p.stat().st_size}\x00{p.stat().st_mtime_ns}\x00".encode())
    identity = h.hexdigest()[:24]
    corpus = StreamedCorpus([], [], [], [], True, identity, specs=specs, options=options)
    index = cache_dir() / "corpora" / f"{identity}.json"
    try:
        sizes = json.loads(index.read_text())
    except (OSError, ValueError):
        sizes = [sum(len(t.encode("utf-8")) for t, _ in group) for group in corpus.groups()]
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(sizes))
        os.replace(tmp, index)
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    spans = [Span(0, starts[k], starts[k + 1]) for k in range(len(sizes))]
    # the tail: whole chunks from the end holding `val_fraction` of the text (at least one, never all)
    k = len(spans)
    while k > 1 and starts[-1] - starts[k] < val_fraction * starts[-1]:
        k -= 1
    if k == len(spans) or k == 0:
        raise UserError("the corpus is too small to split off a validation part; give more text or --val")
    corpus.train, tail = spans[:k], spans[k:]
    tail_bytes = starts[-1] - starts[k]
    corpus.val_whole = tail_bytes <= VAL_WHOLE_BYTES
    if not corpus.val_whole:
        count = min(len(tail), VAL_SAMPLE_BYTES // VAL_PIECE_BYTES)
        picked = sorted({int(i * len(tail) / count) for i in range(count)})
        tail = [Span(0, tail[i].start, tail[i].start + VAL_SAMPLE_BYTES // count) for i in picked]
    corpus.val = tail
    return corpus


def _spread(tail: list[Span], tail_bytes: int) -> list[Span]:
    """VAL_SAMPLE_BYTES of the tail in pieces at evenly spaced offsets: the same for every run on the corpus."""
    count = VAL_SAMPLE_BYTES // VAL_PIECE_BYTES
    spans, position = [], 0
    targets = iter(int(k * tail_bytes / count) for k in range(count))
    target = next(targets)
    for span in tail:
        length = span.end - span.start
        while target is not None and target < position + length:
            start = span.start + target - position
            spans.append(Span(span.file, start, min(start + VAL_PIECE_BYTES, span.end)))
            target = next(targets, None)
        position += length
    return spans


def sample_documents(documents: list[str]) -> tuple[list[str], bool]:
    """(validation documents, whole): `documents` where they fit VAL_WHOLE_BYTES, else VAL_SAMPLE_BYTES of them in
    pieces cut at line ends at evenly spaced positions, each piece a document of its own."""
    sizes = [len(d) for d in documents]
    total = sum(sizes)
    if sum(len(d.encode("utf-8")) for d in documents) <= VAL_WHOLE_BYTES:
        return documents, True
    count = VAL_SAMPLE_BYTES // VAL_PIECE_BYTES
    pieces, doc, before = [], 0, 0
    for k in range(count):
        target = k * total // count
        while before + sizes[doc] <= target:
            before += sizes[doc]
            doc += 1
        text, start = documents[doc], target - before
        if start:
            start = text.find("\n", start) + 1 or len(text)
        end = text.find("\n", start + VAL_PIECE_BYTES) + 1 or len(text)
        if text[start:end].strip():
            pieces.append(text[start:end])
    return pieces, False


def _cut_at(f, offset: int, size: int) -> int:
    """The first position at or after `offset` just past a newline between two non-space bytes (where byte-level
    BPE splits anyway, so pieces cut there encode as the whole does); 0 and the file's end stay; past
    BOUNDARY_SEARCH without one, after any newline or space; the file's end if none."""
    if offset <= 0 or offset >= size:
        return min(max(offset, 0), size)
    for window in (1 << 16, BOUNDARY_SEARCH):  # nearly always found in the first, small read
        f.seek(offset - 1)
        data = f.read(window + 2)
        i = 0
        while (i := data.find(b"\n", i + 1)) != -1 and i + 1 < len(data):
            if not data[i - 1 : i].isspace() and not data[i + 1 : i + 2].isspace():
                return offset + i
    loose = [j for j in (data.find(b"\n", 1), data.find(b" ", 1)) if j != -1]
    return offset + min(loose) if loose else size


def encode_span_texts(texts: Iterator[tuple[str, bool]], tok: Tokenizer) -> Iterator[np.ndarray]:
    """Token ids of each (text, starts a document), the separator first where a document starts."""
    sep, dtype = eot_id(tok), token_dtype(tok)
    batch = []
    for item in texts:
        batch.append(item)
        if len(batch) == 8:  # encode_batch spreads a few chunks over the cores
            yield from _encode(batch, tok, sep, dtype)
            batch = []
    if batch:
        yield from _encode(batch, tok, sep, dtype)


def _encode(batch, tok: Tokenizer, sep: int, dtype) -> Iterator[np.ndarray]:
    for (_, starts), ids in zip(batch, encode_texts(tok, [t for t, _ in batch])):
        yield np.asarray(([sep] if starts else []) + ids, dtype=dtype)


class TokenCache:
    """Training tokens of a chunked corpus for one tokenizer: chunks appended in the corpus' order, a sidecar
    listing them. A run needing more tokens than cached appends the next chunks; a killed run leaves at most
    unlisted bytes at the end, cut off next time."""

    def __init__(self, corpus: ChunkedCorpus, tok: Tokenizer, tok_key: str):
        self.corpus, self.tok = corpus, tok
        self.dtype = token_dtype(tok)
        folder = cache_dir() / "tokens" / f"chunked-{corpus.identity}-{tok_key}"
        folder.mkdir(parents=True, exist_ok=True)
        # named after the corpus and tokenizer: a resumed run checks it is reading the same data by this name
        self.data, self.index = folder / f"train-{folder.name}.{np.dtype(self.dtype).name}", folder / "train.json"
        self.val_path = folder / f"val.{np.dtype(self.dtype).name}"
        try:
            meta = json.loads(self.index.read_text())
        except (OSError, ValueError):
            meta = {"chunks": 0, "tokens": 0, "bytes": 0}
        self.chunks, self.tokens, self.bytes = meta["chunks"], meta["tokens"], meta["bytes"]

    def train(self, needed_tokens: int, say=None) -> np.memmap:
        """At least `needed_tokens` training tokens (all the corpus has, if fewer), encoding what is missing."""
        order = self.corpus.order()
        if self.tokens < needed_tokens and self.chunks < len(order):
            with self.data.open("ab") as f:
                f.truncate(self.tokens * np.dtype(self.dtype).itemsize)
                while self.tokens < needed_tokens and self.chunks < len(order):
                    # the next chunks, read in corpus order: enough to pass the need at the rate so far (a batch
                    # of streamed chunks is one pass over the corpus)
                    rate = self.bytes / self.tokens if self.tokens else 1.5  # bytes per token, low at first
                    want = int((needed_tokens - self.tokens) * rate / CHUNK_BYTES) + 1
                    batch = sorted(order[self.chunks : self.chunks + min(want, 256)])
                    spans = [self.corpus.train[int(i)] for i in batch]
                    for ids in encode_span_texts(self.corpus.read_many(spans), self.tok):
                        f.write(ids.tobytes())
                        self.tokens += len(ids)
                    self.bytes += sum(s.end - s.start for s in spans)
                    self.chunks += len(batch)
                    f.flush()
                    self._save_index()
        return np.memmap(self.data, dtype=self.dtype, mode="r", shape=(self.tokens,))

    def _save_index(self) -> None:
        tmp = self.index.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"chunks": self.chunks, "tokens": self.tokens, "bytes": self.bytes}))
        os.replace(tmp, self.index)

    def validation(self) -> tuple[np.memmap, int]:
        """(tokens, UTF-8 bytes) of the validation text."""
        texts = list(self.corpus.read_many(self.corpus.val))
        # sample pieces are separate windows of text: each starts with the separator, as a document does
        texts = [(t, starts or not self.corpus.val_whole) for t, starts in texts]
        n_bytes = sum(len(t.encode("utf-8")) for t, _ in texts)
        if not self.val_path.exists():
            tmp = self.val_path.with_suffix(f".tmp{os.getpid()}")
            with tmp.open("wb") as f:
                for ids in encode_span_texts(iter(texts), self.tok):
                    f.write(ids.tobytes())
            os.replace(tmp, self.val_path)
        return np.memmap(self.val_path, dtype=self.dtype, mode="r"), n_bytes
