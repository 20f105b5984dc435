"""Which masking rate should `--arch bert` default to under a small budget?

    .venv/bin/python bench/mask_rate.py [--rates 0.15 0.25] [--budget 90s] [--data ../shared/data/tinyshakespeare/input.txt]

Pretrains a BERT at each rate on the same data and budget, then scores every model on the same validation masks
at each of the rates (a loss at one rate is not comparable with a loss at another: more masks, less context).
Prints a Markdown table (results go into docs/architectures.md)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from budgetlm.data.sources import load_corpus, split_validation
from budgetlm.data.tokenizer import MASK, eot_id, special_tokens
from budgetlm.data.tokens import encode_to_memmap
from budgetlm.train.checkpoint import load_model
from budgetlm.train.mlm import MaskedLMTask

TS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare" / "input.txt"


def score(folder: Path, data: str, rate: float) -> dict:
    model, config, tok = load_model(folder)
    _, val_docs = split_validation(load_corpus([data]).documents, 0.1)  # pretrain's default split
    val = encode_to_memmap(val_docs, tok, folder / f"val-{rate}.tokens")
    first_special = min(tok.token_to_id(t) for t in special_tokens("bert"))
    task = MaskedLMTask(val, val, config["context"], 8, torch.device("cpu"), mask_rate=rate,
                        mask_id=tok.token_to_id(MASK), random_below=first_special, keep=(eot_id(tok),))
    with torch.no_grad():
        return task.evaluate(model, None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", type=float, nargs="+", default=[0.15, 0.25])
    parser.add_argument("--budget", default="90s")
    parser.add_argument("--data", default=str(TS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rate in args.rates:
            out = Path(tmp) / f"r{rate}"
            subprocess.run([sys.executable, "-m", "budgetlm", "pretrain", "--arch", "bert", "--mask-rate", str(rate),
                            "--data", args.data, "--budget", args.budget, "--seed", str(args.seed), "--out", str(out),
                            "--quiet"], check=True)
            rows.append((rate, {r: score(out, args.data, r) for r in args.rates}))
    print("| trained at | " + " | ".join(f"loss / accuracy at {r:g}" for r in args.rates) + " |")
    print("|---:|" + "---:|" * len(args.rates))
    for rate, scores in rows:
        print(f"| {rate:g} | " + " | ".join(f"{s['val_loss']:.4f} / {s['val_mlm_accuracy']:.4f}"
                                          for s in scores.values()) + " |")


if __name__ == "__main__":
    main()
