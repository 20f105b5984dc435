"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback."""

import subprocess
import sys

import pytest

TINY = ["--n-layer", "1", "--d-model", "32", "--n-head", "1", "--context", "32", "--vocab-size", "300",
        "--compile", "off", "--max-steps", "2"]


def budgetlm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "budgetlm", *args], capture_output=True, text=True, cwd=cwd)


def assert_one_line_error(done, *fragments):
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = [l for l in done.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_missing_path(tmp_path):
    assert_one_line_error(budgetlm("pretrain", "--data", str(tmp_path / "nope.txt"), *TINY), "no such file")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    assert_one_line_error(budgetlm("pretrain", "--data", str(tmp_path / "empty.txt"), *TINY), "corpus is empty")


def test_binary_or_wrongly_encoded_files_only(tmp_path):
    (tmp_path / "a.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "b.txt").write_bytes("déjà vu".encode("latin-1"))
    done = budgetlm("pretrain", "--data", str(tmp_path), *TINY)
    assert_one_line_error(done, "binary or not UTF-8")
    assert "skipped 2 file(s)" in done.stderr


def test_validation_shorter_than_one_context_window(tmp_path, play_text):
    (tmp_path / "train.txt").write_text(play_text)
    (tmp_path / "val.txt").write_text("Too short.\n")
    done = budgetlm("pretrain", "--data", str(tmp_path / "train.txt"), "--val", str(tmp_path / "val.txt"), *TINY)
    assert_one_line_error(done, "fewer than one context window")


@pytest.mark.parametrize("args,fragment", [
    (["--budget", "5 minutes"], "cannot read the duration"),
    (["--val-fraction", "2"], "val_fraction: 2.0 is out of range"),
    (["--lr", "-1"], "lr: -1.0 is out of range"),
    (["--d-model", "30", "--n-head", "4"], "not divisible"),
    (["--bpe-dropout", "1.5"], "bpe_dropout: 1.5 is out of range"),
])
def test_bad_values(tmp_path, play_text, args, fragment):
    (tmp_path / "t.txt").write_text(play_text)
    assert_one_line_error(budgetlm("pretrain", "--data", str(tmp_path / "t.txt"), *TINY, *args), fragment)


def test_bpe_dropout_with_a_tokenizer_that_is_not_bpe(tmp_path, play_text):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([play_text], trainers.WordLevelTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "words.json"))
    (tmp_path / "t.txt").write_text(play_text)
    done = budgetlm("pretrain", "--data", str(tmp_path / "t.txt"), *TINY, "--tokenizer", str(tmp_path / "words.json"),
                    "--bpe-dropout", "0.1")
    assert_one_line_error(done, "--bpe-dropout needs a BPE tokenizer")


def test_unknown_choice_is_rejected_by_the_parser(tmp_path):
    done = budgetlm("pretrain", "--precision", "fp8")
    assert done.returncode == 2 and "invalid choice" in done.stderr and "Traceback" not in done.stderr


def test_generate_from_a_folder_that_is_not_a_model(tmp_path):
    assert_one_line_error(budgetlm("generate", "--model", str(tmp_path), "--prompt", "x"), "not a budgetlm model folder")


def test_corrupted_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"arch": "gpt", "vocab_size": 300, "context": 32, "n_layer": 1, "n_head": 1, "d_model": 32}')
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    assert_one_line_error(budgetlm("generate", "--model", str(tmp_path)), "corrupted")


def test_bad_toml_config(tmp_path):
    (tmp_path / "c.toml").write_text("[train]\nlearning_rate = 3\n")
    assert_one_line_error(budgetlm("pretrain", "--config", str(tmp_path / "c.toml")), "unknown key 'learning_rate'")
    (tmp_path / "d.toml").write_text("[train]\nschedule = 'zigzag'\n")
    assert_one_line_error(budgetlm("pretrain", "--config", str(tmp_path / "d.toml")), "'zigzag' is not allowed")


def test_output_folder_that_cannot_be_created(tmp_path, play_text):
    (tmp_path / "t.txt").write_text(play_text)
    (tmp_path / "file").write_text("not a folder")
    done = budgetlm("pretrain", "--data", str(tmp_path / "t.txt"), *TINY, "--out", str(tmp_path / "file" / "run"))
    assert_one_line_error(done, "--out")


def test_a_diverging_run_keeps_its_best_weights_and_exits_3(tmp_path, play_text):
    (tmp_path / "t.txt").write_text(play_text)
    out = tmp_path / "run"
    done = budgetlm("pretrain", "--data", str(tmp_path / "t.txt"), *TINY[:-2], "--max-steps", "60",
                    "--optim", "sgd", "--lr", "1e6", "--out", str(out))
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    assert "non-finite" in done.stderr
    assert (out / "model.safetensors").exists()


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_generate_refuses_a_temperature_that_is_not_zero_or_a_finite_positive_number(temperature):
    from budgetlm.errors import UserError
    from budgetlm.workflows import generate

    with pytest.raises(UserError, match="--temperature"):  # checked before the model folder is read
        generate.run("no-such-folder", "x", temperature=temperature)
