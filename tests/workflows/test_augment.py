import json

import pytest

from budgetlm.data.labelled import read_rows
from budgetlm.errors import UserError
from budgetlm.workflows import augment


@pytest.fixture
def synonyms(tmp_path):
    path = tmp_path / "syn.json"
    path.write_text(json.dumps({"movie": ["film"], "good": ["fine"]}))
    return str(path)


def test_tsv_keeps_header_columns_and_literal_quotes(tmp_path, synonyms):
    src = tmp_path / "train.tsv"
    src.write_text('id\tsentence\tlabel\n7\ta "good" movie indeed \t1\n8\tbad plot\t0\n')
    result = augment.run(src, tmp_path / "aug.tsv", spec="sr=0.5,rs=0.5,n=3", seed=1, synonyms=synonyms)
    columns, rows = read_rows(tmp_path / "aug.tsv")
    assert columns == ["id", "sentence", "label"]
    assert result["rows_in"] == 2 and result["rows_out"] == len(rows) == 8
    assert rows[0] == {"id": "7", "sentence": 'a "good" movie indeed ', "label": "1"}
    assert [r["id"] for r in rows] == ["7"] * 4 + ["8"] * 4
    assert [r["label"] for r in rows] == ["1"] * 4 + ["0"] * 4
    assert any("film" in r["sentence"] for r in rows[1:4])


def test_jsonl_keeps_other_fields_and_is_deterministic(tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps({"text": f"one two three four {i}", "y": i % 2, "meta": {"k": i}}) + "\n"
                           for i in range(4)))
    augment.run(src, tmp_path / "a.jsonl", text_column="text", label_column="y", spec="rd=0.3,rs=0.3,n=2")
    augment.run(src, tmp_path / "b.jsonl", text_column="text", label_column="y", spec="rd=0.3,rs=0.3,n=2")
    out = (tmp_path / "a.jsonl").read_text()
    assert out == (tmp_path / "b.jsonl").read_text()
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 12 and all(set(r) == {"text", "y", "meta"} for r in rows)
    assert rows[4]["meta"] == rows[5]["meta"] == {"k": 1}


@pytest.mark.parametrize("spec, dst, fragment", [
    ("n=4", "out.tsv", "switches every operation off"),
    ("rs=0.1", "out.csv", "same format"),
    ("rs=0.1", "train.tsv", "OUT is the input"),
])
def test_errors(tmp_path, spec, dst, fragment):
    src = tmp_path / "train.tsv"
    src.write_text("sentence\tlabel\na b\t1\nc d\t0\n")
    with pytest.raises(UserError, match=fragment):
        augment.run(src, tmp_path / dst, spec=spec)
