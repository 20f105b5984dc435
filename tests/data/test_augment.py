import random
import re
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from budgetlm.data.augment import (
    DEFAULT_SPEC,
    AugmentConfig,
    augment_copies,
    augment_dataset,
    parse_augment_spec,
    random_deletion,
    random_insertion,
    random_swap,
    synonym_replacement,
)
from budgetlm.data.wordnet import SynonymTable
from budgetlm.errors import UserError

SYNONYMS = SynonymTable({
    "movie": ["film", "picture"],
    "good": ["fine", "well"],  # "well" is a stopword: never used
    "actors": ["players"],
    "plot": ["story line"],
    "the": ["this thing"],  # a stopword: never replaced
})
SENTENCE = "the movie was good and the actors made the plot work".split()
STOPWORDS_IN_SENTENCE = {i for i, w in enumerate(SENTENCE) if w in ("the", "was", "and", "made")}
VOCAB = ["the", "movie", "was", "good", "and", "actors", "plot", "a", "dull", "very", ",", "."]
sentences = st.lists(st.sampled_from(VOCAB), min_size=0, max_size=30)


def is_subsequence(short, long):
    it = iter(long)
    return all(word in it for word in short)


def test_parse_full_spec_and_round_trip():
    cfg = parse_augment_spec(DEFAULT_SPEC)
    assert cfg == AugmentConfig(sr=0.1, ri=0.1, rs=0.1, rd=0.1, n=4)
    assert parse_augment_spec(cfg.to_spec()) == cfg
    assert cfg.operations == ("sr", "ri", "rs", "rd") and cfg.needs_synonyms


def test_parse_leaves_unnamed_operations_off():
    cfg = parse_augment_spec(" rs=0.2 , rd=0.3 ")
    assert cfg == AugmentConfig(rs=0.2, rd=0.3, n=4)
    assert not cfg.needs_synonyms
    assert not parse_augment_spec("n=4").enabled
    assert not parse_augment_spec("sr=0.1,n=0").enabled


@pytest.mark.parametrize("spec, fragment", [
    ("sr=0.1,xx=0.2", "unknown key 'xx'"),
    ("sr=1.5", "outside [0, 1]"),
    ("rd=-0.1", "outside [0, 1]"),
    ("ri=lots", "not a number"),
    ("sr=0.1,n=2.5", "not a whole number"),
    ("n=-1", "n=-1"),
    ("sr=0.1,sr=0.2", "given twice"),
    ("sr", "not key=value"),
])
def test_parse_errors(spec, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        parse_augment_spec(spec)


def test_synonym_replacement_changes_n_non_stopwords():
    rng = random.Random(0)
    out = synonym_replacement(SENTENCE, 0.3, SYNONYMS, rng)  # n = round(0.3 * 11) = 3
    assert len(out) == len(SENTENCE)
    changed = [i for i, (a, b) in enumerate(zip(SENTENCE, out)) if a != b]
    assert len(changed) == 3
    assert not set(changed) & STOPWORDS_IN_SENTENCE
    for i in changed:
        assert out[i] in SYNONYMS(SENTENCE[i]) and out[i] != "well"


def test_synonym_replacement_at_least_one_and_keeps_capitals():
    assert synonym_replacement(["Movie"], 0.01, SYNONYMS, random.Random(1))[0] in ("Film", "Picture")
    assert synonym_replacement(["the", "and"], 1.0, SYNONYMS, random.Random(1)) == ["the", "and"]


def test_random_insertion_adds_n_synonyms_of_non_stopwords():
    out = random_insertion(SENTENCE, 0.2, SYNONYMS, random.Random(3))  # n = round(2.2) = 2
    assert len(out) == len(SENTENCE) + 2
    assert is_subsequence(SENTENCE, out)
    inserted = Counter(out) - Counter(SENTENCE)
    allowed = {"film", "picture", "fine", "players", "story line"}
    assert set(inserted) <= allowed and sum(inserted.values()) == 2
    assert random_insertion(["the", "was"], 0.5, SYNONYMS, random.Random(0)) == ["the", "was"]


@given(sentences, st.floats(0.01, 1.0), st.integers(0, 10**6))
def test_random_swap_keeps_the_words_and_changes_at_most_2n_positions(words, alpha, seed):
    out = random_swap(words, alpha, random.Random(seed))
    assert Counter(out) == Counter(words)
    n = max(1, round(alpha * len(words)))
    assert sum(a != b for a, b in zip(words, out)) <= 2 * n


@given(sentences, st.floats(0.0, 1.0), st.integers(0, 10**6))
def test_random_deletion_keeps_an_ordered_non_empty_subset(words, p, seed):
    out = random_deletion(words, p, random.Random(seed))
    assert is_subsequence(out, words)
    assert bool(out) == bool(words)


def test_random_deletion_extremes():
    assert random_deletion(SENTENCE, 0.0, random.Random(0)) == SENTENCE
    survivor = random_deletion(SENTENCE, 1.0, random.Random(0))
    assert len(survivor) == 1 and survivor[0] in SENTENCE
    assert random_deletion(["alone"], 1.0, random.Random(0)) == ["alone"]


@given(sentences, st.integers(0, 10**6))
def test_no_operation_touches_a_stopword_except_by_moving_or_deleting_it(words, seed):
    stop_counts = Counter(w for w in words if w in ("the", "was", "and", "a", "very"))
    sr = synonym_replacement(words, 0.5, SYNONYMS, random.Random(seed))
    ri = random_insertion(words, 0.5, SYNONYMS, random.Random(seed))
    for out in (sr, ri):
        assert Counter(w for w in out if w in stop_counts or w == "well" or w == "this thing") == stop_counts


def test_dataset_gets_n_copies_with_labels_after_each_original():
    texts = [" ".join(SENTENCE), "a dull plot", "good"]
    cfg = parse_augment_spec(DEFAULT_SPEC)
    out_texts, out_labels = augment_dataset(texts, ["1", "0", "1"], cfg, SYNONYMS, seed=7)
    assert len(out_texts) == len(out_labels) == 3 * 5
    assert out_texts[::5] == texts
    assert out_labels == ["1"] * 5 + ["0"] * 5 + ["1"] * 5


def test_same_seed_same_output_regardless_of_order_or_neighbours():
    texts = [" ".join(SENTENCE), "a dull plot with very good actors", "the movie"]
    cfg = parse_augment_spec("sr=0.2,ri=0.2,rs=0.2,rd=0.2,n=6")
    first, _ = augment_dataset(texts, [0, 1, 0], cfg, SYNONYMS, seed=11)
    assert augment_dataset(texts, [0, 1, 0], cfg, SYNONYMS, seed=11)[0] == first
    assert augment_copies(texts[1], cfg, SYNONYMS, 11, 1) == first[8:14]  # example 1 alone
    assert augment_dataset(texts, [0, 1, 0], cfg, SYNONYMS, seed=12)[0] != first


def test_every_enabled_operation_is_used():
    cfg = AugmentConfig(rs=0.5, rd=0.5, n=2)
    copies = augment_copies("one two three four five six seven eight", cfg, None, 0, 0)
    assert len(copies[0].split()) == 8  # swap
    assert len(copies[1].split()) < 8  # deletion


def test_disabled_config_returns_originals_and_missing_synonyms_is_a_bug():
    assert augment_dataset(["a b"], ["x"], AugmentConfig(n=3), None, 0) == (["a b"], ["x"])
    with pytest.raises(ValueError):
        augment_dataset(["a b"], ["x"], AugmentConfig(sr=0.1), None, 0)
