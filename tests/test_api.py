import re
import subprocess
import sys
from pathlib import Path

import pytest

import budgetlm
from budgetlm.config import TrainConfig, apply
from budgetlm.errors import UserError

DOC = Path(__file__).resolve().parents[1] / "docs" / "python.md"
# what the test adds to the doc's calls so that they take seconds: tiny models and 20 steps in place of the budget
TINY_PRETRAIN = {"budget": None, "n_layer": 1, "d_model": 32, "n_head": 1, "context": 32, "micro_batch": 4,
                 "vocab_size": 300, "max_steps": 20, "compile": "off", "calibrate": False}
TINY_FINETUNE = {"budget": None, "size": "tiny", "max_length": 16, "max_steps": 20, "vocab_size": 300}


def doc_blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), re.S)


def shape(line: str) -> str:
    """The start of a line's first word, its figures blurred (digits, and the doc's x): what stays from run to
    run (a generated text may go on right after the prompt)."""
    return re.sub(r"[\dx]+", "N", (line.split() or [""])[0])[:6]


def test_the_docs_example_runs_and_prints_what_the_doc_shows(play_text, tmp_path, monkeypatch, capsys):
    (tmp_path / "input.txt").write_text(play_text)
    words = [("warm", "pos"), ("witty", "pos"), ("gorgeous", "pos"), ("dull", "neg"), ("long", "neg"), ("flat", "neg")]
    for name, n in (("train.tsv", 60), ("dev.tsv", 12)):
        rows = [f"a {words[i % 6][0]} film number {i}\t{words[i % 6][1]}" for i in range(n)]
        (tmp_path / name).write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    pretrain, finetune = budgetlm.pretrain, budgetlm.finetune
    monkeypatch.setattr(budgetlm, "pretrain", lambda *a, **k: pretrain(*a, **{**k, **TINY_PRETRAIN}))
    monkeypatch.setattr(budgetlm, "finetune", lambda *a, **k: finetune(*a, **{**k, **TINY_FINETUNE}))
    code, = doc_blocks("python")[:1]
    exec(compile(code, str(DOC), "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    shown = doc_blocks("text")[0].strip().splitlines()
    # the generated text between may run over several lines; the lines around it are as the doc shows
    assert [shape(line) for line in printed[:1] + printed[-3:]] == [shape(line) for line in shown[:1] + shown[-3:]]
    assert printed[1].startswith("ROMEO:") and len("\n".join(printed[1:-3])) > len("ROMEO:")
    assert (tmp_path / "runs" / "shakespeare" / "model.safetensors").is_file()
    assert re.fullmatch(r"\[\{'label': '(pos|neg)', .*\}\]", printed[-1])


def test_a_wrong_setting_raises_the_line_the_config_raises(play_file, tmp_path):
    with pytest.raises(UserError) as from_api:
        budgetlm.pretrain(play_file, out=tmp_path / "x", optim="adamw2")
    with pytest.raises(UserError) as from_config:
        apply(TrainConfig(), {"optim": "adamw2"})
    assert str(from_api.value) == str(from_config.value)
    with pytest.raises(UserError, match=r"unknown key 'n_layers' \(did you mean n_layer\?\)"):
        budgetlm.pretrain(play_file, out=tmp_path / "x", n_layers=2)
    with pytest.raises(UserError, match="unknown key 'optim_arg'"):
        budgetlm.finetune(play_file, out=tmp_path / "x", optim_arg="eps=1")
    assert not (tmp_path / "x").exists()


def test_quiet_prints_nothing_and_a_language_model_does_not_predict(play_file, tmp_path, capfd):
    run = budgetlm.pretrain(play_file, out=tmp_path / "lm", quiet=True, **TINY_PRETRAIN)
    assert capfd.readouterr() == ("", "")
    assert run.summary["steps"] == 20 and run.plan is None and run.path == tmp_path / "lm"
    with pytest.raises(UserError, match="not a classifier"):
        run.model.predict("text")
    assert run.model.eval(play_file)["bpb"] == pytest.approx(run.model.eval(str(play_file))["bpb"])
    hf = run.model.export(tmp_path / "hf")
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()


def test_import_budgetlm_loads_no_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, budgetlm; print(budgetlm.__version__, "
                           "'torch' in sys.modules, callable(budgetlm.pretrain), 'torch' in sys.modules)"],
                          capture_output=True, text=True, check=True)
    # not even the API's functions need torch until one of them runs
    assert done.stdout.split() == [budgetlm.__version__, "False", "True", "False"]
