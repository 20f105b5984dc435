import json

import numpy as np
import pytest

from budgetlm.data import chunks
from budgetlm.data.chunks import TokenCache, chunked, encode_span_texts, sample_documents, streamed
from budgetlm.data.sources import iter_pieces
from budgetlm.data.tokenizer import eot_id, train_tokenizer


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 8 << 10)


@pytest.fixture(scope="module")
def tok(play_text):
    return train_tokenizer([play_text], 400)


def test_chunks_tile_the_training_text_and_encode_as_the_whole(small_chunks, play_file, play_text, tok):
    """Read in file order, the chunks join to the training part (all but the tail) and their streamed tokens are
    the tokens of that text encoded at once; the token cache holds the same chunks in the corpus' seeded order."""
    corpus = chunked([play_file], 0.1)
    assert len(corpus.train) > 10 and corpus.val_whole
    texts = [corpus.read(s) for s in corpus.train]
    train_text = "".join(t for t, _ in texts)
    val_text = "".join(corpus.read(s)[0] for s in corpus.val)
    assert train_text + val_text == play_text
    assert 0.85 < len(train_text.encode()) / len(play_text.encode()) < 0.95
    streamed = np.concatenate(list(encode_span_texts(iter(texts), tok)))
    whole = [eot_id(tok), *tok.encode(train_text).ids]
    assert streamed.tolist() == whole
    cached = np.asarray(TokenCache(corpus, tok, "t").train(10**9))
    assert len(cached) == len(whole) and sorted(cached.tolist()) == sorted(whole)
    part = TokenCache(corpus, tok, "part")
    head = np.asarray(part.train(len(whole) // 5))
    taken = corpus.order()[: part.chunks]
    # across the text, not its head (the seeded order depends on the file's path, so no position is fixed)
    assert part.chunks < len(corpus.train) / 2 and sorted(taken.tolist()) != list(range(part.chunks))
    assert head.tolist() != whole[: len(head)]


def test_the_token_cache_grows_for_a_longer_run_and_keeps_what_it_has(small_chunks, play_file, tok):
    corpus = chunked([play_file], 0.1)
    first = np.array(TokenCache(corpus, tok, "t").train(5000))
    assert 5000 <= len(first) < 15000
    read = []
    original = corpus.read
    corpus.read = lambda span: read.append(span) or original(span)
    again = TokenCache(corpus, tok, "t")
    assert np.array_equal(again.train(5000), first) and not read  # a second run encodes nothing
    before = again.chunks
    longer = np.asarray(again.train(20000))
    assert len(longer) >= 20000 and np.array_equal(longer[: len(first)], first)
    # only the chunks next in the corpus' order were read, and the cache on disk says so
    assert set(read) == {corpus.train[int(i)] for i in corpus.order()[before : again.chunks]}
    assert TokenCache(corpus, tok, "t").tokens == len(longer)


def test_a_large_tail_is_validated_on_a_fixed_spread_sample(monkeypatch, small_chunks, play_file, play_text):
    monkeypatch.setattr(chunks, "VAL_WHOLE_BYTES", 4 << 10)
    monkeypatch.setattr(chunks, "VAL_SAMPLE_BYTES", 2 << 10)
    monkeypatch.setattr(chunks, "VAL_PIECE_BYTES", 512)
    corpus = chunked([play_file], 0.1)
    assert not corpus.val_whole and len(corpus.val) == 4
    assert corpus.val == chunked([play_file], 0.1).val  # the same for every run
    tail_start = len(play_text.encode()) * 0.9 - 8192
    assert all(s.start >= tail_start for s in corpus.val)
    assert corpus.val[-1].start - corpus.val[0].start > 0.5 * 0.1 * len(play_text.encode())  # spread over it
    docs, whole = sample_documents([play_text[:4000]])
    assert whole and docs == [play_text[:4000]]
    docs, whole = sample_documents([play_text[i : i + 3000] for i in range(0, 30000, 3000)])
    assert not whole and len(docs) == 4 and all(d in play_text for d in docs)


def test_a_large_table_streams_in_chunks_sized_once(small_chunks, monkeypatch, tmp_path, play_text, tok):
    """JSON lines cannot be entered at an offset: one pass sizes the chunks (remembered), later passes keep the
    chunks asked for; the chunks hold every record once, training and validation apart."""
    records = [play_text[i : i + 700] for i in range(0, len(play_text), 700)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"body": r}) + "\n" for r in records))
    corpus = streamed([str(path)], 0.1, {"text_field": "body", "text_column": None})
    assert len(corpus.train) > 10 and corpus.val_whole
    read = [text for text, starts in corpus.read_many(corpus.train + corpus.val) if starts]
    assert read == [r for r in records if r.strip()]
    held = sum(len(t.encode()) for t, _ in corpus.read_many(corpus.val)) / len(play_text.encode())
    assert 0.08 < held < 0.2
    passes = []
    monkeypatch.setattr(chunks, "iter_pieces", lambda *a, **k: passes.append(1) or iter_pieces(*a, **k))
    again = streamed([str(path)], 0.1, {"text_field": "body", "text_column": None})
    assert again.train == corpus.train and not passes  # sized once
    cached = np.asarray(TokenCache(again, tok, "t").train(10**9))
    whole = np.concatenate(list(encode_span_texts(again.read_many(again.train), tok)))
    assert sorted(cached.tolist()) == sorted(whole.tolist())
