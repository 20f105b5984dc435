"""A pretraining run's text, ready to train on: the documents split into training and validation, the
tokenizer, and both splits as cached token streams. `pretrain` and `plan` set up their data here, so a
plan counts the same tokens the run will read."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from budgetlm.data.default_corpus import default_corpus_files
from budgetlm.data.sources import load_corpus, split_validation
from budgetlm.data.tokenizer import default_vocab_size, load_tokenizer, train_tokenizer
from budgetlm.data.tokens import cache_dir, cached_tokens, content_hash
from budgetlm.report import say


@dataclass
class PreparedText:
    train_docs: list[str]
    val_docs: list[str]
    tokenizer: object
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    val_bytes: int


def prepare_text(d, tokenizer_path: Path | None = None) -> PreparedText:
    """Documents → train/validation split → tokenizer → cached token streams, from the [data] settings `d`.
    `tokenizer_path`: a tokenizer to keep (a resumed run's), else `tokenizer_for`'s."""
    sources = d.data or [str(p) for p in default_corpus_files()]
    corpus = load_corpus(sources, text_field=d.text_field, text_column=d.text_column)
    if d.val:
        train_docs = corpus.documents
        val_docs = load_corpus(d.val, text_field=d.text_field, text_column=d.text_column).documents
    else:
        train_docs, val_docs = split_validation(corpus.documents, d.val_fraction)
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path is not None else tokenizer_for(train_docs, d)
    return PreparedText(train_docs, val_docs, tokenizer, cached_tokens(train_docs, tokenizer, "train"),
                        cached_tokens(val_docs, tokenizer, "val"), sum(len(t.encode("utf-8")) for t in val_docs))


def tokenizer_for(train_docs: list[str], d):
    """The user's tokenizer, or BPE trained on the training split (cached by data and size)."""
    if d.tokenizer:
        return load_tokenizer(d.tokenizer)
    n_bytes = sum(len(t.encode("utf-8")) for t in train_docs)
    vocab = d.vocab_size or default_vocab_size(n_bytes)
    path = cache_dir() / "tokenizers" / f"bpe{vocab}-{content_hash(train_docs, str(vocab))}.json"
    if path.exists():
        return load_tokenizer(path)
    started = time.monotonic()
    tok = train_tokenizer(train_docs, vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    say(f"trained a {tok.get_vocab_size()}-token BPE tokenizer in {time.monotonic() - started:.1f}s")
    return tok
