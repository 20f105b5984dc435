import json

import pytest

from budgetlm.data.sources import load_corpus, split_validation
from budgetlm.errors import UserError


def test_text_file_folder_and_glob(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_text("beta text\n")
    (sub / "ignored.bin").write_bytes(b"\x00\x01")
    assert load_corpus([str(tmp_path / "a.txt")]).documents == ["alpha text\n"]
    assert load_corpus([str(tmp_path)]).documents == ["alpha text\n", "beta text\n"]
    assert load_corpus([str(tmp_path / "**" / "*.md")]).documents == ["beta text\n"]
    assert len(load_corpus([str(tmp_path / "a.txt"), str(sub)]).documents) == 2


def test_jsonl_csv_tsv(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "x": 1}) + "\n")
    (tmp_path / "d.csv").write_text('id,body\n1,"hello, world"\n2,second\n')
    (tmp_path / "d.tsv").write_text("sentence\tlabel\nit works\t1\nit fails\t0\n")
    assert load_corpus([str(tmp_path / "d.jsonl")]).documents == ["one", "two"]
    assert load_corpus([str(tmp_path / "d.csv")], text_column="body").documents == ["hello, world", "second"]
    assert load_corpus([str(tmp_path / "d.tsv")], text_column="sentence").documents == ["it works", "it fails"]
    (tmp_path / "f.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert load_corpus([str(tmp_path / "f.jsonl")], text_field="body").documents == ["x"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["a b", "c d"], "n": [1, 2]}), tmp_path / "d.parquet")
    assert load_corpus([str(tmp_path / "d.parquet")], text_column="text").documents == ["a b", "c d"]


@pytest.mark.parametrize("content,args,message", [
    ('{"body": "x"}\n', {}, "has no field 'text'"),
    ("not json\n", {}, "not valid JSON"),
])
def test_jsonl_errors(tmp_path, content, args, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(UserError, match=message):
        load_corpus([str(tmp_path / "d.jsonl")], **args)


def test_table_column_errors(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="choose the text with --text-column"):
        load_corpus([str(tmp_path / "d.csv")])
    with pytest.raises(UserError, match="no column 'c'"):
        load_corpus([str(tmp_path / "d.csv")], text_column="c")


def test_missing_and_empty(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_corpus([str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(UserError, match="corpus is empty"):
        load_corpus([str(tmp_path / "empty.txt")])
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError, match="folder holds no"):
        load_corpus([str(tmp_path / "none")])


def test_binary_and_non_utf8_files_are_skipped_and_counted(tmp_path, capsys):
    (tmp_path / "good.txt").write_text("good text\n")
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\x00\x00\x1a")
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    corpus = load_corpus([str(tmp_path)])
    assert corpus.documents == ["good text\n"]
    assert len(corpus.skipped) == 2
    assert "skipped 2 file(s)" in capsys.readouterr().err


def test_only_unreadable_files_is_an_error(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\x00\x00\x00")
    with pytest.raises(UserError, match="binary or not UTF-8"):
        load_corpus([str(tmp_path)])


def test_single_document_split_cuts_at_a_line_boundary():
    text = "".join(f"line {i}\n" for i in range(1000))
    (train,), (val,) = split_validation([text], 0.1)
    assert train + val == text
    assert train.endswith("\n") and val.startswith("line ")
    assert 0.09 < len(val) / len(text) < 0.11


def test_split_never_breaks_a_character():
    text = "é" * 1000  # two bytes each, no newline
    (train,), (val,) = split_validation([text], 0.1)
    assert train + val == text


def test_many_documents_hold_out_whole_documents_from_the_tail():
    docs = [f"doc {i} " * 50 for i in range(20)]
    train, val = split_validation(docs, 0.1)
    assert train + val == docs
    assert len(val) == 2


def test_split_errors():
    with pytest.raises(UserError, match="between 0 and 1"):
        split_validation(["abc"], 1.5)
    with pytest.raises(UserError, match="too small"):
        split_validation(["x"], 0.1)


def test_a_text_file_streams_in_pieces_that_tokenize_as_the_whole(tmp_path, play_text):
    from budgetlm.data.sources import text_pieces
    from budgetlm.data.tokenizer import train_tokenizer

    path = tmp_path / "play.txt"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n  \n" + play_text.encode())  # a BOM and blank lines first
    pieces = list(text_pieces(path, [], piece_bytes=4096))
    assert len(pieces) > 10 and [starts for _, starts in pieces] == [True] + [False] * (len(pieces) - 1)
    assert "".join(text for text, _ in pieces) == "\n  \n" + play_text
    tok = train_tokenizer([play_text], 600)
    assert [i for text, _ in pieces for i in tok.encode(text).ids] == tok.encode("\n  \n" + play_text).ids
