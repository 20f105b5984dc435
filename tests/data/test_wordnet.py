import json
import sys
from pathlib import Path

import pytest

from budgetlm.data.wordnet import (
    SYSTEM_WORDNET,
    NltkWordNet,
    SynonymTable,
    WordNet,
    load_synonyms,
    parse_data_line,
)
from budgetlm.errors import UserError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "wordnet"


@pytest.fixture(scope="module")
def tiny() -> WordNet:
    return WordNet(FIXTURE)


@pytest.fixture
def no_nltk(monkeypatch):
    """Make `import nltk` fail so the other sources are tried."""
    monkeypatch.setitem(sys.modules, "nltk", None)
    monkeypatch.setitem(sys.modules, "nltk.corpus", None)


def test_parse_data_line_reads_hex_word_count_and_skips_header():
    assert parse_data_line("  1 This software and database is being provided  \n") is None
    line = "00001300 05 n 0b " + " ".join(f"w{i} 0" for i in range(11)) + " 000 | gloss  \n"
    assert parse_data_line(line) == ("n", [f"w{i}" for i in range(11)])
    satellite = "00003100 00 s 02 handy 0 ready_to_hand(p) 0 000 | easy  \n"
    assert parse_data_line(satellite) == ("a", ["handy", "ready to hand"])


def test_synonyms_come_from_the_part_of_speech_with_most_senses(tiny):
    # "run": 2 verb senses beat 1 noun sense, so the noun's "tally" is never offered
    assert tiny("run") == ["go", "operate", "function"]
    # "good": 3 adjective senses (satellites count) beat 1 noun sense; markers stripped, itself left out
    assert tiny("good") == ["full", "handy", "ready to hand", "beneficial", "galore"]


def test_ties_go_to_the_noun_and_lookups_ignore_case(tiny):
    assert tiny("film") == ["movie"]  # one noun and one verb sense
    assert tiny("Quickly") == ["rapidly"]


def test_unknown_word_and_eleven_word_synset(tiny):
    assert tiny("zebra") == []
    assert len(tiny("alpha")) == 10 and "alpha" not in tiny("alpha")


def test_folder_without_data_files_says_how_to_get_wordnet(tmp_path):
    with pytest.raises(UserError, match="apt-get install wordnet-base"):
        WordNet(tmp_path)


def test_malformed_data_file_is_a_user_error(tmp_path):
    for name in ("data.noun", "data.verb", "data.adj", "data.adv"):
        (tmp_path / name).write_text((FIXTURE / name).read_text())
    (tmp_path / "data.adv").write_text("this is not wordnet at all\n")
    with pytest.raises(UserError, match="data.adv:1"):
        WordNet(tmp_path)


def test_synonym_table_from_json(tmp_path):
    path = tmp_path / "syn.json"
    path.write_text(json.dumps({"Good": ["fine", "good", "great", "fine"]}))
    table = load_synonyms(path)
    assert isinstance(table, SynonymTable)
    assert table("good") == ["fine", "great"]
    assert table("bad") == []


@pytest.mark.parametrize("content", ["not json", '["a list"]', '{"good": "fine"}'])
def test_bad_synonym_json(tmp_path, content):
    path = tmp_path / "syn.json"
    path.write_text(content)
    with pytest.raises(UserError, match="--synonyms"):
        load_synonyms(path)


def test_explicit_folder_missing_path_and_wrong_kind(tmp_path):
    assert isinstance(load_synonyms(FIXTURE), WordNet)
    with pytest.raises(UserError, match="no such file"):
        load_synonyms(tmp_path / "absent.json")
    (tmp_path / "syn.txt").write_text("good fine")
    with pytest.raises(UserError, match="WordNet database folder or a .json"):
        load_synonyms(tmp_path / "syn.txt")


def test_system_folder_is_used_without_nltk(no_nltk):
    assert load_synonyms(system_folder=FIXTURE)("film") == ["movie"]


def test_no_source_says_how_to_get_one(no_nltk, tmp_path):
    with pytest.raises(UserError) as e:
        load_synonyms(system_folder=tmp_path / "none")
    assert "apt-get install wordnet-base" in str(e.value) and "--synonyms" in str(e.value)


class _FakeSynset:
    def __init__(self, pos, names):
        self._pos, self._names = pos, names

    def pos(self):
        return self._pos

    def lemma_names(self):
        return self._names


class _FakeReader:
    def synsets(self, word):
        return [_FakeSynset("n", ["run", "tally"]), _FakeSynset("v", ["run", "go"]),
                _FakeSynset("v", ["run", "operate"]), _FakeSynset("s", ["ready_to_hand(p)"])]


def test_nltk_adapter_picks_one_part_of_speech():
    assert NltkWordNet(_FakeReader())("run") == ["go", "operate"]


@pytest.mark.skipif(not (SYSTEM_WORDNET / "data.noun").exists(), reason="WordNet not installed (wordnet-base)")
def test_real_wordnet_lookups():
    wn = WordNet(SYSTEM_WORDNET)
    assert "film" in wn("movie")
    assert wn("handy") == ["ready to hand"]
    assert "abounding" in wn("galore")
    assert "operate" in wn("run") and "run" not in wn("run")
    assert wn("the") == []
