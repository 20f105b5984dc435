"""Which body classifies SST-2 best when pretraining and fine-tuning share a budget?

    .venv/bin/python bench/sst2_archs.py [--bodies bert gpt lstm tfidf] [--pretrain 10m] [--finetune 10m]

Each transformer body (`--arch bert`, `--arch gpt`) is pretrained with `budgetlm pretrain` on the SST-2 training
sentences alone (text only, as ../shared/checks/finetune-sst2-scratch does) for `--pretrain`, then fine-tuned
with `budgetlm finetune` on the labelled training set for `--finetune`; the LSTM is fine-tuned from scratch for
`--finetune`; TF-IDF is `budgetlm baseline`. Every model is scored on the SST-2 dev set. Default settings
throughout: the plan picks each body's size. Prints a Markdown table (results go into docs/architectures.md)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from budgetlm.workflows import baseline

SST2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sst2"


def budgetlm(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "budgetlm", *args, "--quiet"], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"budgetlm {args[0]} failed: {done.stderr.strip().splitlines()[-1:]}")


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bodies", nargs="+", default=["bert", "gpt", "lstm", "tfidf"],
                        choices=("bert", "gpt", "t5", "lstm", "tfidf"))
    parser.add_argument("--pretrain", default="10m")
    parser.add_argument("--finetune", default="10m")
    parser.add_argument("--work", help="folder for the runs (default: a new temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="sst2-archs-"))
    work.mkdir(parents=True, exist_ok=True)
    text = work / "sentences.txt"
    rows = (SST2 / "train.tsv").read_text().splitlines()[1:]
    text.write_text("".join(row.split("\t")[0] + "\n" for row in rows))
    labelled = ["--data", str(SST2 / "train.tsv"), "--val", str(SST2 / "dev.tsv"), "--text-column", "sentence",
                "--label-column", "label"]
    lines = []
    for body in args.bodies:
        if body == "tfidf":
            accuracy = baseline.run(SST2 / "train.tsv", SST2 / "dev.tsv", text_column="sentence",
                                    label_column="label")["accuracy"]
            lines.append(f"| TF-IDF + logistic regression | — | {accuracy:.4f} |")
        elif body == "lstm":
            out = work / "lstm"
            budgetlm("finetune", "--model", "scratch", "--arch", "lstm", *labelled, "--budget", args.finetune,
                     "--out", str(out))
            s = summary(out)
            lines.append(f"| LSTM from scratch, {args.finetune} | — | {s['best_val_accuracy']:.4f} |")
        else:
            pre, fine = work / f"{body}-pretrain", work / f"{body}-finetune"
            budgetlm("pretrain", "--arch", body, "--data", str(text), "--budget", args.pretrain, "--out", str(pre))
            p = summary(pre)
            budgetlm("finetune", "--model", str(pre), *labelled, "--budget", args.finetune, "--out", str(fine))
            s = summary(fine)
            model = json.loads((pre / "config.json").read_text())
            shape = f"{model['n_layer']}×{model['d_model']}"
            figure = (f"val_bpb {p['best_val_bpb']:.3f}" if p.get("best_val_bpb") is not None
                      else f"{p['objective']} val_loss {p['best_val_loss']:.3f}")
            members = s.get("members")
            kept = f", {sum(1 for m in members if m.get('kept', True))} members" if isinstance(members, list) else ""
            lines.append(f"| {body.upper()} {shape} pretrained {args.pretrain} ({p['tokens_seen']:,} tokens, {figure}), "
                         f"fine-tuned {args.finetune}{kept} | {p['tokens_per_s']:,.0f} tokens/s | "
                         f"{s['best_val_accuracy']:.4f} |")
        print(lines[-1], flush=True)
    print("\n| body | pretraining speed | SST-2 dev accuracy |\n|---|---|---|")
    print("\n".join(lines))
    print(f"\nruns in {work}")


if __name__ == "__main__":
    main()
