import json

import pytest

from budgetlm.data.labelled import (
    LabelMap,
    find_columns,
    load_labelled,
    read_rows,
    stratified_split,
    write_rows,
)
from budgetlm.errors import UserError


def test_tsv_keeps_quotes_as_text(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\n"quoted" start , and a " stray quote \t1\nplain text \t0\n')
    texts, labels, written = load_labelled(path)
    assert written == {}
    assert texts == ['"quoted" start , and a " stray quote ', "plain text "]
    assert labels == ["1", "0"]


def test_csv_and_jsonl(tmp_path):
    (tmp_path / "d.csv").write_text('id,text,y\n1,"hello, world",pos\n2,bye,neg\n')
    records = [json.dumps({"text": "a", "y": 1}), "", json.dumps({"text": "b", "y": 0}),
               json.dumps({"text": "c", "y": "1"}), json.dumps({"text": "d", "y": True})]
    (tmp_path / "d.jsonl").write_text("\n".join(records) + "\n")
    assert load_labelled(tmp_path / "d.csv", "text", "y") == (["hello, world", "bye"], ["pos", "neg"], {})
    # A JSON 1 and a "1" are one class, compared as text; the first number written is what predict gives back.
    texts, labels, written = load_labelled(tmp_path / "d.jsonl", "text", "y")
    assert (texts, labels) == (["a", "b", "c", "d"], ["1", "0", "1", "true"])
    assert written == {"1": 1, "0": 0, "true": True} and type(written["1"]) is int


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"], "y": [1, 0]}), tmp_path / "d.parquet")
    assert load_labelled(tmp_path / "d.parquet", "text", "y") == (["a", "b"], ["1", "0"], {"1": 1, "0": 0})


@pytest.mark.parametrize("content, fragments", [
    ("id\tsentence\tnote\tlabel\n1\ta b\tx y\t1\n2\tc d\tz w\t0\n",
     ["cannot tell which column holds the text", "'id', 'sentence', 'note', 'label'", "--text-column"]),
    ("sentence\ty\tsource\na b\t1\tweb\nc d\t0\tweb\n", ["which column holds the label", "--label-column"]),
    ("sentence\tlabel\na\t1\nb\t\n", ["row 2", "empty label"]),
    ("sentence\tlabel\na\t1\nb\t1\n", ["every label is '1'", "two classes"]),
    ("sentence\tlabel\n", ["no rows"]),
    ("sentence\tlabel\na\t1\textra\nb\t0\n", ["row 1", "more fields"]),
])
def test_tsv_errors(tmp_path, content, fragments):
    path = tmp_path / "d.tsv"
    path.write_text(content)
    with pytest.raises(UserError) as e:
        load_labelled(path)
    for fragment in fragments:
        assert fragment in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_labelled(tmp_path / "absent.tsv")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UserError, match=r"\.tsv"):
        load_labelled(tmp_path / "d.txt")
    (tmp_path / "d.jsonl").write_text('{"sentence": "a", "label": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match="d.jsonl:2"):
        load_labelled(tmp_path / "d.jsonl")
    (tmp_path / "latin.tsv").write_bytes("sentence\tlabel\ndéjà\t1\n".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8"):
        load_labelled(tmp_path / "latin.tsv")


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl", ".parquet"])
def test_write_then_read_round_trip(tmp_path, suffix):
    rows = [{"sentence": 'say "hi" , friend', "label": "1"}, {"sentence": "no", "label": "0"}]
    write_rows(tmp_path / f"out{suffix}", ["sentence", "label"], rows)
    assert read_rows(tmp_path / f"out{suffix}") == (["sentence", "label"], rows)


def test_tsv_cannot_hold_a_tab(tmp_path):
    with pytest.raises(UserError, match="tab or line break"):
        write_rows(tmp_path / "o.tsv", ["sentence", "label"], [{"sentence": "a\tb", "label": "1"}])


def test_label_map_orders_numbers_numerically():
    m = LabelMap.from_labels(["10", "2", "1", "2", "-1"], {"10": 10, "2": 2, "1": 1, "-1": -1})
    assert m.labels == ("-1", "1", "2", "10") and m.written == (-1, 1, 2, 10)
    assert m.encode(["2", "10"]) == [2, 3]
    assert LabelMap.from_labels(["b", "a"]).written == ()
    words = LabelMap.from_labels(["pos", "neg", "neutral", "neg"])
    assert words.labels == ("neg", "neutral", "pos") and len(words) == 3


def test_label_map_errors():
    m = LabelMap.from_labels(["0", "1"])
    with pytest.raises(UserError, match="'2'.*never occur"):
        m.encode(["0", "2"], "dev.tsv")


def test_stratified_split_is_deterministic_and_covers_every_class():
    labels = ["a"] * 50 + ["b"] * 7 + ["c"] * 2 + ["d"]
    texts = [str(i) for i in range(len(labels))]
    train, val = stratified_split(texts, labels, 0.2, seed=3)
    assert sorted(train + val) == list(range(len(labels)))
    assert (train, val) == stratified_split(texts, labels, 0.2, seed=3)
    assert (train, val) != stratified_split(texts, labels, 0.2, seed=4)
    val_labels = [labels[i] for i in val]
    assert val_labels.count("a") == 10 and val_labels.count("b") == 1 and val_labels.count("c") == 1
    assert "d" not in val_labels  # a single example stays in training
    assert {labels[i] for i in train} == {"a", "b", "c", "d"}


def test_stratified_split_errors():
    with pytest.raises(UserError, match="between 0 and 1"):
        stratified_split(["x", "y"], ["a", "b"], 1.0, 0)
    with pytest.raises(UserError, match="--val"):
        stratified_split(["x", "y"], ["a", "b"], 0.5, 0)


def test_columns_text_and_label_by_default_else_the_only_candidates(tmp_path):
    (tmp_path / "hf.csv").write_text("label,text,id\npos,a fine film,1\nneg,a dull one,2\n")
    assert load_labelled(tmp_path / "hf.csv")[:2] == (["a fine film", "a dull one"], ["pos", "neg"])
    # no `text` or `label`: the only text-like column, and the only other one
    (tmp_path / "glue.tsv").write_text("sentence\tsentiment\nwarm and funny\tpos\ncold\tneg\nslow\tneg\n"
                                       "bright\tpos\n")
    assert load_labelled(tmp_path / "glue.tsv")[:2] == (["warm and funny", "cold", "slow", "bright"],
                                                        ["pos", "neg", "neg", "pos"])
    # named columns win over the rule
    assert load_labelled(tmp_path / "glue.tsv", "sentiment", "sentence")[0] == ["pos", "neg", "neg", "pos"]


def test_headerless_table_by_position(tmp_path):
    path = tmp_path / "nohead.tsv"
    path.write_text("a warm film\tpos\na cold film\tneg\nsome dull film\tneg\n")
    texts, labels, _ = load_labelled(path, "0", "1", header=False)
    assert texts == ["a warm film", "a cold film", "some dull film"] and labels == ["pos", "neg", "neg"]
    assert load_labelled(path, header=False)[:2] == (texts, labels)  # found by the rule too
    with pytest.raises(UserError, match="named by position"):
        load_labelled(path, "text", "1", header=False)


def test_first_row_that_looks_like_data_asks_for_no_header(tmp_path):
    path = tmp_path / "nohead.csv"
    path.write_text("a warm film,pos\na cold film,neg\nsome dull film,pos\n")
    with pytest.raises(UserError) as e:
        load_labelled(path)
    message = str(e.value)
    assert "--no-header" in message and "'pos' occurs below it" in message and "\n" not in message
    with pytest.raises(UserError, match="--no-header"):
        load_labelled(path, "a warm film", "pos")  # named or found, the header is an example
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 1}\n')
    with pytest.raises(UserError, match="for .csv and .tsv"):
        load_labelled(tmp_path / "d.jsonl", header=False)


def test_find_columns_names_the_columns_when_unsure():
    rows = [{"a": "one text", "b": "another text"}, {"a": "more words", "b": "other words"}]
    with pytest.raises(UserError, match="cannot tell which column holds the text .*'a', 'b'"):
        find_columns("t.csv", ["a", "b"], rows)
