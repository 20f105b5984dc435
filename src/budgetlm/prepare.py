"""Pretraining's data, sized by the budget: how many tokens the run will read (from a first plan), the
vocabulary that many tokens can train, what preparing the data costs (predicted and reserved before the
model is sized, or refused when it would leave too little to train), then the tokenizer and token streams.

A corpus up to SMALL_CORPUS_BYTES is read whole, split and encoded as it always was (tinyshakespeare and
WikiText-2 figures stay comparable); a larger one of files is read in chunks (data/chunks.py): the tokenizer
trains on a bounded sample and only what the budget will read is encoded. (A Hugging Face dataset, or a corpus
with --val, is still read whole.)"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from budgetlm.budget import Budget
from budgetlm.config import RunConfig
from budgetlm.data.chunks import (CHUNK_BYTES, ChunkedCorpus, TokenCache, chunked, corpus_bytes, sample_documents,
                                  streamed, text_files)
from budgetlm.data.default_corpus import default_corpus_files
from budgetlm.data.sources import load_corpus, split_validation, warn_skipped
from budgetlm.data.tokenizer import default_vocab_size, load_tokenizer, train_tokenizer, with_special_tokens
from budgetlm.data.tokens import cache_dir, cached_tokens, content_hash, remember
from budgetlm.errors import UserError
from budgetlm.plan import device_peak, plan
from budgetlm.report import say
from budgetlm.train.runtime import precision_dtype

SMALL_CORPUS_BYTES = 16 << 20    # read whole up to this (the default corpus, tinyshakespeare, WikiText-2)
TOKENIZER_SAMPLE_MIN = 4 << 20   # a large corpus' tokenizer trains on this much text, or on as much as the run
TOKENIZER_SAMPLE_MAX = 8 << 20   # encodes (a power of two of megabytes, so similar budgets share it), up to this
TOKEN_MARGIN = 3.0   # tokens encoded per token the first plan expects: runs read 2–4× what it expects (tinyshakespeare 5 min: 1.1M expected, 4.1M read)
BYTES_PER_TOKEN = 3.5            # before a tokenizer exists (byte-level BPE of 4k–16k on English: 3.3–4)
# A vocabulary entry needs examples to train its embedding: at most one entry per this many tokens the first plan
# expects the run to read. On the reference CPU it expects 1.1M and 0.66M for tinyshakespeare and WikiText-2 at
# 5 minutes: caps of 16,384 and 8,192, so their measured-best 4,096 and 8,192 stay.
TOKENS_PER_VOCAB_ENTRY = 64
# Seconds per megabyte of text until this machine has measured its own (remembered in the cache, latest first):
# BPE training at a 4k vocabulary and encoding, measured on this project's 2-core reference CPU under load.
RATES = {"tokenizer_s_per_mb": 0.6, "encode_s_per_mb": 0.4}
UNBUDGETED_TOKENS = 16e6         # a large corpus' tokens encoded for a run limited by steps alone
MIN_TRAIN_SHARE = 0.5            # preparing the data may take at most the rest of the budget


@dataclass
class TrainingData:
    tokenizer: object
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    val_bytes: int
    unique_tokens: int                  # tokens of the whole training text (estimated when only a part is encoded)
    train_texts: Callable[[], list[str]]  # the encoded training text (for BPE-dropout's re-segmentation)
    peak_flops: float | None = None     # the device's matmul peak the first plan used (measured once per run)


def vocab_for(n_bytes: int, tokens_read: float | None) -> int:
    """The corpus' default vocabulary (`default_vocab_size`), capped to one entry per TOKENS_PER_VOCAB_ENTRY
    tokens the run will read (a power of two, at least 512): a short run cannot train 21k embeddings."""
    vocab = default_vocab_size(n_bytes)
    if tokens_read:
        vocab = min(vocab, max(512, 2 ** int(math.log2(max(tokens_read / TOKENS_PER_VOCAB_ENTRY, 1)))))
    return vocab


def sample_bytes(encode_bytes: float) -> int:
    """Bytes of a large corpus the tokenizer trains on: a power of two of megabytes in [MIN, MAX], at most what
    the run encodes beyond the minimum."""
    mb = 2 ** int(math.log2(max(encode_bytes / (1 << 20), 1)))
    return min(max(mb << 20, TOKENIZER_SAMPLE_MIN), TOKENIZER_SAMPLE_MAX)


@dataclass
class Setup:
    """What preparing the data will take for a budget: tokens read, vocabulary, bytes encoded, seconds."""
    tokens_read: float | None
    vocab: int
    encode_bytes: float
    tokenizer_bytes: float
    seconds: float


def predict_setup(budget_s: float | None, train_bytes: int, val_bytes: int, *, chunked_corpus: bool,
                  fixed_tokens: float | None, peak: float | None, device: torch.device, precision: str,
                  micro_batch: int | None, vocab_asked: int | None, tokenizer_cached: bool = False,
                  tokens_cached: int = 0) -> Setup:
    """The first plan: the tokens a run of `budget_s` reads (or `fixed_tokens`), the vocabulary for them,
    and the seconds tokenizer training and encoding will take (nothing for what the caches hold)."""
    unique = train_bytes / BYTES_PER_TOKEN
    tokens_read = fixed_tokens
    vocab = vocab_asked or default_vocab_size(train_bytes)
    seconds = 0.0
    for _ in range(2):  # the setup's time and the tokens read depend on each other: settle them twice
        if budget_s:
            left = max(budget_s - seconds, 1e-3)
            tokens_read = plan(left, train_tokens=int(unique), vocab=vocab, device=device, precision=precision,
                               micro_batch=micro_batch, peak_flops=peak).expected_tokens
        if not vocab_asked:
            vocab = vocab_for(train_bytes, tokens_read)
        if chunked_corpus:
            needed = (tokens_read or UNBUDGETED_TOKENS) * TOKEN_MARGIN
            encode_bytes = min(train_bytes, needed * BYTES_PER_TOKEN)
            tokenizer_bytes = min(train_bytes, sample_bytes(encode_bytes))
            new_bytes = max(0.0, encode_bytes - tokens_cached * BYTES_PER_TOKEN)
        else:
            encode_bytes = tokenizer_bytes = new_bytes = train_bytes
        mb, rates = 1 << 20, setup_rates()
        seconds = ((0 if tokenizer_cached else tokenizer_bytes * rates["tokenizer_s_per_mb"] / mb)
                   + (new_bytes + val_bytes) * rates["encode_s_per_mb"] / mb)
    return Setup(tokens_read, vocab, encode_bytes, tokenizer_bytes, seconds)


def setup_rates() -> dict[str, float]:
    try:
        return {**RATES, **json.loads((cache_dir() / "setup_rates.json").read_text())}
    except (OSError, ValueError):
        return dict(RATES)


def remember_rate(name: str, seconds: float, n_bytes: int) -> None:
    """Keep this machine's fastest measured seconds per megabyte of `name` (from a megabyte on, to be meaningful):
    as plan.device_peak keeps the best matmul speed, so that one run slowed by load elsewhere does not make later
    runs refuse budgets that fit."""
    if n_bytes < 1 << 20:
        return
    path = cache_dir() / "setup_rates.json"
    try:
        measured = json.loads(path.read_text())
    except (OSError, ValueError):
        measured = {}
    rate = seconds / (n_bytes / (1 << 20))
    measured[name] = min(rate, measured.get(name, rate))
    remember(path, measured)


def check_setup_fits(budget_s: float | None, setup: Setup, predict: Callable[[float], Setup],
                     spent_s: float = 0.0) -> None:
    """Refuse, before any work, a budget whose data preparation would leave less than MIN_TRAIN_SHARE of the
    `budget_s` seconds left to train, naming the smallest budget that would work (`spent_s`: already spent)."""
    if budget_s is None or (budget_s > 0 and setup.seconds <= (1 - MIN_TRAIN_SHARE) * budget_s):
        return
    smallest = max(budget_s, 1.0)
    for _ in range(100):  # setup grows with the budget (more tokens to encode), but slower: this ends
        if predict(smallest).seconds <= (1 - MIN_TRAIN_SHARE) * smallest:
            break
        smallest *= 1.1
    else:
        raise UserError(f"preparing the data would take about {setup.seconds:.0f}s, more than any budget affords; "
                        "give less data or a ready --tokenizer")
    raise UserError(f"preparing the data (tokenizer and encoding, about {setup.seconds:.0f}s) would leave too "
                    f"little of the {spent_s + budget_s:.0f}s budget to train; give --budget "
                    f"{math.ceil(spent_s + smallest)}s or more, or less data")


def prepare(cfg: RunConfig, budget: Budget, *, resumed_tokenizer: Path | None, device: torch.device,
            precision: str) -> TrainingData:
    """The tokenizer and token streams for `cfg`'s data, within the budget (see the module's note). The
    first plan estimates the tokens read even where flags fix the model's shape."""
    d, t = cfg.data, cfg.train
    sources = d.data or [str(p) for p in default_corpus_files()]
    skipped: list[str] = []
    files = None if d.val else text_files(sources, skipped)
    total = 0 if d.val else corpus_bytes(sources) or 0
    budget_s = budget.seconds - budget.elapsed() if budget.seconds else None
    spent = budget.elapsed()
    fixed = t.max_tokens if t.max_tokens else None
    peak = device_peak(device, precision_dtype(precision)) if budget_s else None
    vocab_asked = d.vocab_size if not d.tokenizer else None

    if total > SMALL_CORPUS_BYTES:
        warn_skipped(skipped)
        corpus = chunked(files, d.val_fraction) if files else streamed(
            sources, d.val_fraction, {"text_field": d.text_field, "text_column": d.text_column})
        return _prepare_chunked(corpus, cfg, budget_s, spent, fixed, peak, device, precision, vocab_asked,
                                resumed_tokenizer)

    corpus_docs = load_corpus(sources, text_field=d.text_field, text_column=d.text_column)
    if d.val:
        train_docs = corpus_docs.documents
        val_docs = load_corpus(d.val, text_field=d.text_field, text_column=d.text_column).documents
    else:
        train_docs, val_docs = split_validation(corpus_docs.documents, d.val_fraction)
    del corpus_docs
    val_docs, whole = sample_documents(val_docs)
    if not whole:
        say(f"validation: a fixed sample of {sum(len(v) for v in val_docs) / 1e3:.0f} KB spread over the held-out tail")
    train_bytes = sum(len(doc.encode("utf-8")) for doc in train_docs)
    val_bytes = sum(len(doc.encode("utf-8")) for doc in val_docs)

    def predict(seconds):
        return predict_setup(seconds, train_bytes, val_bytes, chunked_corpus=False, fixed_tokens=fixed, peak=peak,
                             device=device, precision=precision, micro_batch=t.micro_batch, vocab_asked=vocab_asked)

    setup = predict(budget_s)
    if resumed_tokenizer is not None:
        tokenizer = load_tokenizer(resumed_tokenizer)
    elif d.tokenizer:
        tokenizer = load_tokenizer(d.tokenizer)
    else:
        path = cache_dir() / "tokenizers" / f"bpe{setup.vocab}-{content_hash(train_docs, str(setup.vocab))}.json"
        if not path.exists():
            check_setup_fits(budget_s, setup, predict, spent)
        tokenizer = _trained_tokenizer(path, lambda: train_docs, setup.vocab)
    tokenizer = with_special_tokens(tokenizer, cfg.model.arch)
    train_tokens = cached_tokens(train_docs, tokenizer, "train")
    val_tokens = cached_tokens(val_docs, tokenizer, "val")
    return TrainingData(tokenizer, train_tokens, val_tokens, val_bytes, len(train_tokens), lambda: train_docs, peak)


def _trained_tokenizer(path: Path, texts: Callable[[], list[str]], vocab: int):
    """The tokenizer cached at `path`, or BPE of `vocab` trained on `texts()` and cached there."""
    if path.exists():
        return load_tokenizer(path)
    started = time.monotonic()
    sample = texts()
    tok = train_tokenizer(sample, vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    seconds = time.monotonic() - started
    remember_rate("tokenizer_s_per_mb", seconds, sum(len(t) for t in sample))
    say(f"trained a {tok.get_vocab_size()}-token BPE tokenizer in {seconds:.1f}s")
    return tok


def _prepare_chunked(corpus: ChunkedCorpus, cfg: RunConfig, budget_s, spent, fixed, peak, device, precision,
                     vocab_asked, resumed_tokenizer) -> TrainingData:
    d, t = cfg.data, cfg.train
    order = corpus.order()
    val_bytes = sum(s.end - s.start for s in corpus.val)

    def tokenizer_path(setup: Setup) -> Path:
        chunks = max(1, math.ceil(setup.tokenizer_bytes / CHUNK_BYTES))
        return cache_dir() / "tokenizers" / f"bpe{setup.vocab}-chunked-{corpus.identity}-{chunks}.json"

    known = bool(resumed_tokenizer or d.tokenizer)

    def predict(seconds):
        return predict_setup(seconds, corpus.train_bytes, val_bytes, chunked_corpus=True, fixed_tokens=fixed,
                             peak=peak, device=device, precision=precision, micro_batch=t.micro_batch,
                             vocab_asked=vocab_asked, tokenizer_cached=known)

    setup = predict(budget_s)
    if resumed_tokenizer is not None or d.tokenizer:
        tokenizer = load_tokenizer(resumed_tokenizer or d.tokenizer)
    else:
        if not tokenizer_path(setup).exists():
            check_setup_fits(budget_s, setup, predict, spent)
        chunks = max(1, math.ceil(setup.tokenizer_bytes / CHUNK_BYTES))
        tokenizer = _trained_tokenizer(
            tokenizer_path(setup),
            lambda: [text for text, _ in corpus.read_many([corpus.train[int(i)] for i in sorted(order[:chunks])])],
            setup.vocab)
    tokenizer = with_special_tokens(tokenizer, cfg.model.arch)
    key = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
    cache = TokenCache(corpus, tokenizer, key)
    started, before, bytes_before = time.monotonic(), cache.tokens, cache.bytes
    train_tokens = cache.train(int(setup.encode_bytes / BYTES_PER_TOKEN))
    val_tokens, val_read = cache.validation()
    if cache.tokens > before:
        remember_rate("encode_s_per_mb", time.monotonic() - started, cache.bytes - bytes_before)
        say(f"encoded {cache.tokens - before:,} more training tokens ({cache.chunks} of {len(order)} chunks of the "
            f"corpus cached) in {time.monotonic() - started:.1f}s")
    unique = int(corpus.train_bytes * cache.tokens / max(cache.bytes, 1))

    def texts() -> list[str]:
        return [text for text, _ in corpus.read_many([corpus.train[int(i)] for i in sorted(order[: cache.chunks])])]

    return TrainingData(tokenizer, train_tokens, val_tokens, val_read, unique, texts, peak)
