import numpy as np
import torch

from budgetlm.data.tokenizer import EOT, default_vocab_size, eot_id, train_tokenizer
from budgetlm.data.tokens import (WindowSampler, bpe_dropout_tokens, cached_tokens, eval_windows, line_pieces,
                                  supports_bpe_dropout, window_sample)


def test_round_trip_any_text(play_text):
    tok = train_tokenizer([play_text], 512)
    assert tok.get_vocab_size() <= 512
    assert eot_id(tok) == tok.token_to_id(EOT) == 0
    for text in [play_text[:2000], "Ünïcödé — 日本語 🙂 tabs\tand\nnewlines  ", "", "   leading spaces"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def test_default_vocab_grows_with_the_corpus():
    sizes = [default_vocab_size(n) for n in (1_000, 100_000, 1_115_394, 3_671_368, 10**9)]
    assert sizes == sorted(sizes)
    assert sizes[0] == 512 and sizes[-1] == 32768
    assert sizes[2:4] == [4096, 8192]  # tinyshakespeare, the SST-2 training sentences
    assert all(s & (s - 1) == 0 for s in sizes)


def test_token_cache_is_reused(play_text, tmp_path):
    tok = train_tokenizer([play_text], 512)
    first = cached_tokens([play_text], tok, "train")
    second = cached_tokens([play_text], tok, "train")
    assert first.filename == second.filename
    assert first.dtype == np.uint16
    assert first[0] == eot_id(tok)
    assert tok.decode(first[1:].tolist()) == play_text


def documents_of(tok, stream):
    """The texts a stream holds: its runs between document separators, decoded."""
    sep = eot_id(tok)
    cuts = [i for i, t in enumerate(stream.tolist()) if t == sep] + [len(stream)]
    return [tok.decode(stream[a + 1 : b].tolist()) for a, b in zip(cuts, cuts[1:])]


def test_bpe_dropout_respells_the_text_in_smaller_pieces(play_text):
    tok = train_tokenizer([play_text], 512)
    assert supports_bpe_dropout(tok)
    texts = [play_text[:20_000], play_text[20_000:40_000]]
    clean = np.asarray(cached_tokens(texts, tok, "train"))
    stream, drawn = bpe_dropout_tokens(texts, tok, clean, 0.1, 3, seed=0)
    assert drawn
    assert (np.asarray(stream[: len(clean)]) == clean).all()  # the clean pass comes first
    assert documents_of(tok, stream) == texts * 4  # every pass spells the same texts
    noisy = np.asarray(stream[len(clean):])
    passes = np.split(noisy, np.flatnonzero(noisy == eot_id(tok))[::2][1:])
    assert len(passes) == 3
    assert all(len(p) > 1.03 * len(clean) for p in passes)  # skipped merges: more, smaller pieces
    assert len({p.tobytes() for p in passes}) == 3  # each pass drawn anew
    assert tok.model.dropout is None  # the caller's tokenizer is left deterministic


def test_line_pieces_tokenize_exactly_as_the_whole_text(play_text):
    tok = train_tokenizer([play_text], 512)
    text = play_text[:30_000] + "\n\n  indented\nlast line\n"
    pieces = line_pieces(text, size=700)
    assert len(pieces) > 20 and "".join(pieces) == text
    assert all(p.endswith("\n") for p in pieces[:-1])
    joined = [i for p in pieces for i in tok.encode(p, add_special_tokens=False).ids]
    assert joined == tok.encode(text, add_special_tokens=False).ids
    assert line_pieces("short", size=700) == ["short"]


def test_bpe_dropout_streams_are_kept_per_seed(play_text):
    tok = train_tokenizer([play_text], 512)
    texts = [play_text[:20_000]]
    clean = np.asarray(cached_tokens(texts, tok, "train"))
    first, _ = bpe_dropout_tokens(texts, tok, clean, 0.1, 2, seed=0)
    again, drawn_again = bpe_dropout_tokens(texts, tok, clean, 0.1, 2, seed=0)
    other, drawn_other = bpe_dropout_tokens(texts, tok, clean, 0.1, 2, seed=1)
    assert not drawn_again and (np.asarray(first) == np.asarray(again)).all()
    assert drawn_other and first.filename != other.filename


def test_sampler_is_a_pure_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = WindowSampler(tokens, 64, 4, seed=1)
    b = WindowSampler(tokens, 64, 4, seed=1)
    x1, y1 = a.batch_at(7)
    a.batch_at(500)  # jump to another epoch and back
    x2, _ = a.batch_at(7)
    x3, _ = b.batch_at(7)
    assert (x1 == x2).all() and (x1 == x3).all()
    assert (y1[:, :-1] == x1[:, 1:]).all()
    assert not (WindowSampler(tokens, 64, 4, seed=2).batch_at(7)[0] == x1).all()


def test_sampler_visits_every_window_once_per_epoch():
    tokens = np.arange(64 * 41 + 1, dtype=np.uint16)
    s = WindowSampler(tokens, 64, 1, seed=0)
    starts = {int(s.batch_at(i)[0][0, 0]) for i in range(s.n_windows)}
    assert len(starts) == s.n_windows


def test_micro_batches_tile_the_big_batch():
    tokens = np.arange(20_000, dtype=np.uint16)
    big = WindowSampler(tokens, 32, 8, seed=0).batch_at(3)[0]
    small = WindowSampler(tokens, 32, 2, seed=0)
    parts = [small.batch_at(3, m, 4)[0] for m in range(4)]
    assert (np.concatenate(parts) == big.numpy()).all()


def test_eval_windows_predict_every_token_once():
    tokens = np.arange(1000, dtype=np.uint16)
    targets = []
    for x, y in eval_windows(tokens, 64, 4):
        assert x.shape == y.shape == (4, 64)
        targets.extend(int(t) for t in y.flatten() if t != -100)
    assert targets == list(range(1, 1000))


def test_the_window_sample_spreads_over_the_stream_and_depends_only_on_it():
    tokens = np.random.default_rng(0).integers(0, 500, 64 * 300 + 1).astype(np.uint16)
    starts = window_sample(tokens, 64, 20)
    assert len(set(starts)) == 20 and all(s % 64 == 0 for s in starts)
    assert set(starts * 10 // len(tokens)) == set(range(10))  # every tenth of the stream
    assert np.array_equal(starts, window_sample(tokens.copy(), 64, 20))
    other = tokens.copy()
    other[5] += 1
    assert not np.array_equal(starts, window_sample(other, 64, 20))
    assert np.array_equal(window_sample(tokens, 64, 300), np.arange(300) * 64)  # all of them: the whole stream


def test_stream_windows_cut_the_batches_of_the_whole_stream():
    from budgetlm.data.tokens import stream_windows

    tokens = np.arange(1000)
    cuts = [0, 7, 300, 301, 640, 1000]
    chunks = [tokens[a:b] for a, b in zip(cuts, cuts[1:])]
    streamed, whole = list(stream_windows(chunks, 16, 4)), list(eval_windows(tokens, 16, 4))
    assert len(streamed) == len(whole) == 16
    for (xs, ys), (xw, yw) in zip(streamed, whole):
        assert torch.equal(xs, xw) and torch.equal(ys, yw)
