import json
import re

import numpy as np
import pytest
import torch

from budgetlm import prepare as prep
from budgetlm.budget import Budget
from budgetlm.config import RunConfig
from budgetlm.data import chunks
from budgetlm.data.sources import split_validation
from budgetlm.data.tokenizer import default_vocab_size, train_tokenizer
from budgetlm.data.tokens import cache_dir, cached_tokens
from budgetlm.errors import UserError

CPU = torch.device("cpu")
PEAK = 1e11  # a fixed device speed, so the plans here do not depend on the machine running the test


def _config(path, **train) -> RunConfig:
    cfg = RunConfig()
    cfg.data.data = [str(path)]
    for name, value in train.items():
        setattr(cfg.train, name, value)
    return cfg


@pytest.fixture
def large_corpus(monkeypatch, tmp_path, play_text):
    """A corpus over the small-corpus bound, with the bounds scaled down so the test stays fast."""
    monkeypatch.setattr(prep, "SMALL_CORPUS_BYTES", 100 << 10)
    monkeypatch.setattr(prep, "TOKENIZER_SAMPLE_MIN", 16 << 10)
    monkeypatch.setattr(prep, "TOKENIZER_SAMPLE_MAX", 32 << 10)
    monkeypatch.setattr(prep, "CHUNK_BYTES", 8 << 10)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 8 << 10)
    path = tmp_path / "big.txt"
    path.write_text(play_text * 3)
    return path


def test_a_large_corpus_trains_its_tokenizer_on_a_bounded_sample_and_encodes_what_the_run_reads(
        large_corpus, monkeypatch):
    sampled = []
    monkeypatch.setattr(prep, "train_tokenizer", lambda texts, vocab: sampled.append(texts) or train_tokenizer(texts, vocab))
    cfg = _config(large_corpus, max_tokens=6000)
    cfg.data.vocab_size = 300
    data = prep.prepare(cfg, Budget(max_tokens=6000), resumed_tokenizer=None, device=CPU, precision="fp32")
    sample_bytes = sum(len(t.encode()) for t in sampled[0])
    assert 16 << 10 <= sample_bytes <= (32 << 10) + (8 << 10)  # the cap, give or take a chunk's cut
    assert large_corpus.stat().st_size > 10 * sample_bytes
    encoded = len(data.train_tokens)
    assert 6000 * prep.TOKEN_MARGIN <= encoded < 6000 * prep.TOKEN_MARGIN + 8000  # the need, plus at most a batch's cut
    assert data.unique_tokens > 3 * encoded  # the plan still knows the whole corpus' size
    assert len(data.val_tokens) > 1000 and data.val_bytes > 0


def test_a_small_corpus_gets_the_tokenizer_and_split_it_always_had(play_file, play_text):
    cfg = _config(play_file, max_steps=10)  # no limit on the tokens read: the corpus alone sets the vocabulary
    data = prep.prepare(cfg, Budget(max_steps=10), resumed_tokenizer=None, device=CPU, precision="fp32")
    train_docs, val_docs = split_validation([play_text], 0.1)
    n_bytes = len(train_docs[0].encode())
    assert data.tokenizer.get_vocab_size() == default_vocab_size(n_bytes)
    expected = train_tokenizer(train_docs, default_vocab_size(n_bytes))
    assert data.tokenizer.to_str() == expected.to_str()
    assert np.array_equal(data.train_tokens, cached_tokens(train_docs, expected, "train"))
    assert np.array_equal(data.val_tokens, cached_tokens(val_docs, expected, "val"))
    assert data.val_bytes == len(val_docs[0].encode())


def _predict(budget_s, n_bytes, *, chunked_corpus=True):
    return prep.predict_setup(budget_s, n_bytes, 1 << 20, chunked_corpus=chunked_corpus, fixed_tokens=None,
                              peak=PEAK, device=CPU, precision="fp32", micro_batch=None, vocab_asked=None)


def test_the_vocabulary_shrinks_with_the_budget_not_only_the_corpus():
    short, long = _predict(30, 10**9), _predict(3600, 10**9)
    assert short.tokens_read < long.tokens_read
    assert short.vocab < long.vocab <= default_vocab_size(10**9)
    assert short.encode_bytes < long.encode_bytes  # and so does the text encoded
    assert prep.vocab_for(1_000_000, 1.08e6) == 4096  # tinyshakespeare at 5 minutes keeps its vocabulary


def test_setup_that_would_eat_the_budget_is_refused_with_the_smallest_budget_that_works():
    def predict(seconds):  # a corpus tokenized whole: setup does not shrink with the budget
        return _predict(seconds, 400 << 20, chunked_corpus=False)

    with pytest.raises(UserError, match=r"give --budget \d+s or more") as refused:
        prep.check_setup_fits(60, predict(60), predict)
    smallest = int(re.search(r"--budget (\d+)s", str(refused.value)).group(1))
    assert predict(smallest).seconds <= (1 - prep.MIN_TRAIN_SHARE) * smallest
    assert predict(smallest / 1.2).seconds > (1 - prep.MIN_TRAIN_SHARE) * smallest / 1.2
    prep.check_setup_fits(smallest, predict(smallest), predict)  # that budget passes


def test_a_run_is_refused_before_its_setup_starts(large_corpus, monkeypatch):
    """With this machine's measured rates making setup too slow, nothing is trained or encoded."""
    (cache_dir()).mkdir(parents=True, exist_ok=True)
    (cache_dir() / "setup_rates.json").write_text(json.dumps({"tokenizer_s_per_mb": 5000, "encode_s_per_mb": 5000}))
    monkeypatch.setattr(prep, "device_peak", lambda device, dtype: PEAK)
    monkeypatch.setattr(prep, "train_tokenizer", lambda *a: pytest.fail("trained a tokenizer for a refused run"))
    with pytest.raises(UserError, match="give --budget"):
        prep.prepare(_config(large_corpus), Budget(seconds=60), resumed_tokenizer=None, device=CPU, precision="fp32")
    assert not (cache_dir() / "tokens").exists()


def test_the_setup_rate_kept_is_the_fastest_measured():
    """One slow measurement (a machine busy elsewhere) must not make later runs refuse budgets that fit."""
    mb = 1 << 20
    prep.remember_rate("tokenizer_s_per_mb", 0.5, 2 * mb)
    assert prep.setup_rates()["tokenizer_s_per_mb"] == pytest.approx(0.25)
    prep.remember_rate("tokenizer_s_per_mb", 40.0, 2 * mb)  # the slow one
    assert prep.setup_rates()["tokenizer_s_per_mb"] == pytest.approx(0.25)
    prep.remember_rate("tokenizer_s_per_mb", 0.2, 2 * mb)
    assert prep.setup_rates()["tokenizer_s_per_mb"] == pytest.approx(0.1)
    prep.remember_rate("encode_s_per_mb", 1.0, mb // 2)  # under a megabyte: not kept
    assert prep.setup_rates()["encode_s_per_mb"] == prep.RATES["encode_s_per_mb"]


def test_a_budget_already_spent_is_refused_with_a_finite_suggestion():
    def predict(seconds):
        return _predict(seconds, 1 << 20, chunked_corpus=False)

    with pytest.raises(UserError, match=r"give --budget \d+s") as refused:
        prep.check_setup_fits(-5.0, predict(-5.0), predict, spent_s=25.0)
    assert int(re.search(r"--budget (\d+)s", str(refused.value)).group(1)) > 25


def test_pretrain_on_a_large_corpus_trains_on_the_part_it_encoded(large_corpus, tmp_path, capsys):
    from budgetlm.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(large_corpus), "--max-tokens", "4096", "--out", str(out), "--n-layer", "1",
                 "--d-model", "32", "--n-head", "2", "--context", "32", "--micro-batch", "4", "--vocab-size", "300",
                 "--compile", "off", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens_seen"] >= 4096 and summary["best_val_bpb"] < 8
    err = capsys.readouterr().err
    assert "encoded" in err and "chunks of the corpus cached" in err
    encoded = int(re.search(r"encoded ([\d,]+) more", err).group(1).replace(",", ""))
    assert 4096 * prep.TOKEN_MARGIN <= encoded < large_corpus.stat().st_size / 4  # a part, not the corpus
