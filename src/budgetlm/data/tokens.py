"""Token streams on disk (numpy memmaps, cached by content hash) and the batches cut from them."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from budgetlm.data.tokenizer import eot_id

ENCODE_CHUNK = 1024  # documents per encode_batch call: bounded memory, still parallel


def cache_dir() -> Path:
    root = os.environ.get("BUDGETLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "budgetlm")
    return Path(root)


def remember(path: Path, data: dict) -> None:
    """Write what this machine measured (a JSON file in the cache) atomically, or not at all: a read-only cache
    only costs the next run the figure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


def content_hash(texts: list[str], *extra: str) -> str:
    h = hashlib.sha256()
    for part in extra:
        h.update(part.encode())
        h.update(b"\x00")
    for t in texts:
        h.update(len(t).to_bytes(8, "little"))
        h.update(t.encode("utf-8"))
    return h.hexdigest()[:24]


def token_dtype(tok: Tokenizer) -> type:
    return np.uint16 if tok.get_vocab_size() <= 65536 else np.uint32


def encode_to_memmap(texts: list[str], tok: Tokenizer, path: Path, *, passes: int = 1,
                     first: np.ndarray | None = None, in_pieces: bool = False) -> np.memmap:
    """Tokenize documents into `path` (each document preceded by the separator), `passes` times
    over and after the tokens `first` if given, and map it. `in_pieces`: long documents are cut
    into pieces at line ends (`line_pieces`) so that `encode_batch` spreads one document over
    the cores. Written to a temporary name and renamed, so a killed run never leaves a partial file."""
    dtype = token_dtype(tok)
    sep = eot_id(tok)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("wb") as f:
        if first is not None:
            f.write(np.asarray(first, dtype=dtype).tobytes())
        for _ in range(passes):
            for i in range(0, len(texts), ENCODE_CHUNK):
                for ids in _encode(tok, texts[i : i + ENCODE_CHUNK], in_pieces):
                    f.write(np.asarray([sep, *ids], dtype=dtype).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return np.memmap(path, dtype=dtype, mode="r")


def line_pieces(text: str, size: int = 1 << 16) -> list[str]:
    """`text` cut into pieces of about `size` characters, each cut after a newline with a
    non-space character on both sides: the byte-level pre-tokenizer splits there anyway, so the
    pieces' tokens, joined, are the text's."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and not _between_words(text, cut):
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start : cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


def _between_words(text: str, i: int) -> bool:
    return 0 < i < len(text) - 1 and not text[i - 1].isspace() and not text[i + 1].isspace()


def _encode(tok: Tokenizer, docs: list[str], in_pieces: bool) -> list[list[int]]:
    if not in_pieces:
        return [enc.ids for enc in tok.encode_batch(docs, add_special_tokens=False)]
    owners, pieces = [], []
    for d, doc in enumerate(docs):
        for piece in line_pieces(doc):
            owners.append(d)
            pieces.append(piece)
    ids: list[list[int]] = [[] for _ in docs]
    for d, enc in zip(owners, tok.encode_batch(pieces, add_special_tokens=False)):
        ids[d].extend(enc.ids)
    return ids


def cached_tokens(texts: list[str], tok: Tokenizer, name: str) -> np.memmap:
    """The token stream of `texts`, tokenized once per (data, tokenizer) and memory-mapped after."""
    stream, _ = _cached_stream(f"{name}-{content_hash(texts, tok.to_str())}", tok,
                               lambda path: encode_to_memmap(texts, tok, path))
    return stream


def _cached_stream(stem: str, tok: Tokenizer, encode) -> tuple[np.memmap, bool]:
    """The cached token stream `stem` of `tok`'s ids, or `encode(path)` writing it; (stream, encoded now)."""
    dtype = token_dtype(tok)
    path = cache_dir() / "tokens" / f"{stem}.{np.dtype(dtype).name}"
    if path.exists():
        return np.memmap(path, dtype=dtype, mode="r"), False
    return encode(path), True


def bpe_dropout_tokens(texts: list[str], tok: Tokenizer, clean: np.ndarray, rate: float, passes: int,
                       seed: int) -> tuple[np.memmap, bool]:
    """A training stream for BPE-dropout (Provilkov et al. 2020): `clean` (the stream of `texts` as
    `tok` segments them), then `passes` more segmentations in which each merge is skipped with
    probability `rate`, so a model reading the text many times sees its words spelled many ways in
    smaller pieces: a regularizer against memorizing. Returns (stream, drawn now).

    `tokenizers` does not seed that randomness, so the stream is drawn once per (data, tokenizer,
    rate, passes, seed) and cached: runs of one seed on one machine train on the same tokens, and
    a resumed run finds the stream it started with unless the cache was emptied in between."""
    spec = tok.to_str()

    def draw(path: Path) -> np.memmap:
        noisy = Tokenizer.from_str(spec)
        noisy.model.dropout = rate
        # pieces only where cutting at line ends cannot change the text: byte-level pre-tokenizers
        in_pieces = isinstance(tok.pre_tokenizer, pre_tokenizers.ByteLevel)
        return encode_to_memmap(texts, noisy, path, passes=passes, first=clean, in_pieces=in_pieces)

    key = content_hash(texts, spec, f"bpe-dropout {rate!r} {passes} {seed}")
    return _cached_stream(f"train-bpe-dropout-{key}", tok, draw)


def supports_bpe_dropout(tok: Tokenizer) -> bool:
    return isinstance(tok.model, models.BPE)


@dataclass
class WindowSampler:
    """Training batches of `context`+1 tokens. Each epoch visits every non-overlapping window once,
    in a shuffled order and at a random phase; the batch for a step is a pure function of
    (seed, step), so a resumed run sees exactly the data it would have seen."""

    tokens: np.ndarray
    context: int
    batch: int
    seed: int = 0

    def __post_init__(self):
        self.n_windows = (len(self.tokens) - 1) // self.context - 1
        if self.n_windows < 1:
            raise ValueError("token stream is shorter than two context windows")
        self._epoch, self._order, self._phase = -1, None, 0

    def _plan_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch])
        self._epoch, self._order = epoch, rng.permutation(self.n_windows)
        self._phase = int(rng.integers(self.context))

    def batch_at(self, step: int, micro: int = 0, micro_steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        first = (step * micro_steps + micro) * self.batch
        rows = []
        for sample in range(first, first + self.batch):
            epoch, index = divmod(sample, self.n_windows)
            if epoch != self._epoch:
                self._plan_epoch(epoch)
            start = self._phase + int(self._order[index]) * self.context
            rows.append(self.tokens[start : start + self.context + 1])
        chunk = torch.from_numpy(np.stack(rows).astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]


def eval_windows(tokens: np.ndarray, context: int, batch: int, starts: np.ndarray | None = None):
    """Every token of the stream after the first, predicted exactly once: non-overlapping windows,
    in batches of a fixed shape (the last one padded with ignored targets, -100). `starts`: only
    those windows (positions from `window_sample`)."""
    n = len(tokens) - 1
    starts = list(range(0, n, context)) if starts is None else [int(s) for s in starts]
    for i in range(0, len(starts), batch):
        x = torch.zeros(batch, context, dtype=torch.int64)
        y = torch.full((batch, context), -100, dtype=torch.int64)
        for row, s in enumerate(starts[i : i + batch]):
            length = min(context, n - s)
            window = torch.from_numpy(tokens[s : s + length + 1].astype(np.int64))
            x[row, :length] = window[:-1]
            y[row, :length] = window[1:]
        yield x, y


def window_sample(tokens: np.ndarray, context: int, count: int) -> np.ndarray:
    """Start positions of `count` of the non-overlapping windows of `eval_windows`, spread over the whole
    stream: the windows are cut into `count` equal runs and one is drawn from each (stratified, so a
    stream easier at one end than the other gives no biased sample). The draw is seeded by the tokens
    themselves, so every run on the same text and tokenizer scores the same windows; all windows when
    `count` reaches their number."""
    total = math.ceil((len(tokens) - 1) / context)
    if count >= total:
        return np.arange(total, dtype=np.int64) * context
    seed = int.from_bytes(hashlib.blake2b(np.ascontiguousarray(tokens).tobytes(), digest_size=8).digest(), "little")
    edges = np.arange(count + 1, dtype=np.int64) * total // count
    picked = edges[:-1] + np.floor(np.random.default_rng(seed).random(count) * np.diff(edges)).astype(np.int64)
    return picked * context


def stream_tokens(pieces, tok: Tokenizer, group_bytes: int = 1 << 20):
    """The token stream of (text, starts a document) pieces (`sources.iter_pieces`), as arrays of about
    `group_bytes` of text each, with the separator before each document; yields (ids, UTF-8 bytes they encode).
    Pieces are encoded a group at a time so that `encode_batch` spreads them over the cores."""
    sep = eot_id(tok)
    group: list[tuple[str, bool]] = []
    size = 0
    for text, starts in pieces:
        group.append((text, starts))
        size += len(text)
        if size >= group_bytes:
            yield _encode_group(tok, group, sep)
            group, size = [], 0
    if group:
        yield _encode_group(tok, group, sep)


def _encode_group(tok: Tokenizer, group: list[tuple[str, bool]], sep: int) -> tuple[np.ndarray, int]:
    parts = []
    for (_, starts), ids in zip(group, encode_texts(tok, [text for text, _ in group])):
        if starts:
            parts.append(np.asarray([sep], dtype=np.int64))
        parts.append(np.asarray(ids, dtype=np.int64))
    return np.concatenate(parts), sum(len(text.encode("utf-8")) for text, _ in group)


def encode_texts(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """The ids of each text. With a byte-level pre-tokenizer, long texts are encoded in `line_pieces`: the same
    ids, spread over the cores, and memory bounded by a piece (one call on a megabyte of text held 0.2 GB and left
    the process larger after each)."""
    return _encode(tok, texts, isinstance(tok.pre_tokenizer, pre_tokenizers.ByteLevel))


def stream_windows(chunks, context: int, batch: int):
    """`eval_windows` of the concatenated `chunks` (arrays of ids), holding about one chunk and one batch
    of tokens at a time: memory does not grow with the stream."""
    span = batch * context
    rest = np.empty(0, dtype=np.int64)
    for chunk in chunks:
        buffer, start = np.concatenate([rest, chunk]), 0
        while len(buffer) - start > span:
            yield from eval_windows(buffer[start : start + span + 1], context, batch)
            start += span
        rest = buffer[start:]
    if len(rest) > 1:
        yield from eval_windows(rest, context, batch)
