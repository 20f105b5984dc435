"""Fine-tuning under torchrun: 2 DDP processes (gloo on CPU) end where 1 process ends with the same batch and
seed, report the same validation figures, and write the run's files once."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from budgetlm.cli import main
from budgetlm.data.tokenizer import train_tokenizer
from budgetlm.models.config import ModelConfig
from budgetlm.models.gpt import GPT
from budgetlm.train.checkpoint import save_model
from tests.train.test_distributed import processes_of
from tests.workflows.test_finetune import toy_rows, write_tsv

TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="needs torchrun beside the Python interpreter")

STEPS = 12
# dropout 0: each process draws its own dropout masks, which one process cannot reproduce
COMMON = ["--max-steps", str(STEPS), "--eval-every", "4", "--batch-size", "8", "--micro-batch", "4",
          "--dropout", "0", "--precision", "fp32", "--threads", "1", "--seed", "5", "--lr", "3e-3",
          "--warmup", "2", "--quiet"]


def torchrun(args: list[str], nproc: int = 2) -> str:
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), "-m", "budgetlm", *args]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        said, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # torchrun's workers run on in sessions of their own
        for pid in processes_of(Path(args[args.index("--out") + 1])):
            os.kill(pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, said[-3000:]
    return said


def max_diff(a: Path, b: Path) -> float:
    one, two = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(one) == set(two)
    return max((one[k] - two[k]).abs().max().item() for k in one)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Toy sentiment rows and a 1-layer budgetlm GPT body without dropout (its weights random: what is
    compared is how the ranks train it, not what it knows)."""
    root = tmp_path_factory.mktemp("dist-finetune")
    train = write_tsv(root / "train.tsv", toy_rows(160, 0))
    dev = write_tsv(root / "dev.tsv", toy_rows(150, 1))  # 3 evaluation batches of 64: split unevenly
    tok = train_tokenizer([t for t, _ in toy_rows(400, 2)], 300)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=320, context=64, n_layer=1, d_model=32, n_head=2, dropout=0.0)
    body = root / "body"
    save_model(body, GPT(config), config.to_dict(), tok)
    return train, dev, body


def hf_body(folder: Path, tokenizer_of: Path) -> str:
    """A 1-layer Hugging Face BERT without dropout, with the GPT body's tokenizer."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    (folder / "tokenizer.json").write_bytes((tokenizer_of / "tokenizer.json").read_bytes())
    return f"hf:{folder}"


@pytest.mark.parametrize("kind", ["gpt", "hf"])
def test_ddp_finetune_in_two_processes_ends_where_one_process_ends(data, tmp_path, kind):
    train, dev, body = data
    model = str(body) if kind == "gpt" else hf_body(tmp_path / "bert", body)
    args = ["finetune", "--model", model, "--data", str(train), "--val", str(dev), "--text-column", "sentence",
            "--ema", "0.9", "--save-every", "6", *COMMON]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    said = torchrun([*args, "--out", str(tmp_path / "two")])
    assert "× 2 processes, ddp" in said
    assert max_diff(tmp_path / "one", tmp_path / "two") <= 1e-5
    one, two = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    assert two["world_size"] == 2 and two["strategy"] == "ddp" and two["steps"] == STEPS
    assert two["examples_seen"] == one["examples_seen"] == STEPS * 8  # the global batch, not one rank's share
    for key in ("best_val_accuracy", "best_val_macro_f1", "best_step"):
        assert two[key] == one[key], key
    assert two["best_val_loss"] == pytest.approx(one["best_val_loss"], rel=1e-5)
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4, 8, 12]  # one writer: no duplicates
    # the validation batches split over the ranks and put back together: one process's figures
    first = next(json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines())
    assert evals[0]["val_examples"] == first["val_examples"] == 150
    assert evals[0]["val_accuracy"] == first["val_accuracy"]
    assert evals[0]["val_loss"] == pytest.approx(first["val_loss"], rel=1e-6)
    # the moving average was checkpointed with the sharded checkpoint
    saved = sorted((tmp_path / "two" / "checkpoints").glob("step-*"))
    assert saved and json.loads((saved[-1] / "state.json").read_text())["has_averaged"]


def test_finetune_under_torchrun_refuses_what_it_cannot_split(data, tmp_path, monkeypatch, capsys):
    train, dev, body = data
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["finetune", "--model", str(body), "--data", str(train), "--val", str(dev), "--text-column", "sentence",
            "--max-steps", "2", "--quiet"]
    assert main([*args, "--strategy", "fsdp", "--out", str(tmp_path / "fsdp")]) == 2
    assert "--strategy fsdp is for pretrain" in capsys.readouterr().err
    assert main([*args, "--members", "2", "--out", str(tmp_path / "members")]) == 2
    assert "under torchrun give --members 1" in capsys.readouterr().err
