"""Does EDA augmentation help a model trained from scratch on little data?

    .venv/bin/python bench/augmentation.py [--examples 500] [--seeds 0 1 2] [--arch lstm] [--budget 90s]

Samples N training examples from SST-2 (stratified, fixed sample), then for each seed fine-tunes the
from-scratch model with and without `--augment sr=0.1,ri=0.1,rs=0.1,rd=0.1,n=4`, selecting on and
reporting SST-2 dev accuracy. Prints a Markdown table (results go into docs/finetune.md)."""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SST2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sst2"


def sample(n: int, path: Path, seed: int = 1234) -> None:
    with (SST2 / "train.tsv").open() as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rng = random.Random(seed)
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    picked = []
    for label, group in sorted(by_label.items()):
        picked += rng.sample(group, round(n * len(group) / len(rows)))
    rng.shuffle(picked)
    with path.open("w") as f:
        f.write("sentence\tlabel\n")
        for row in picked:
            f.write(f"{row['sentence']}\t{row['label']}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arch", default="lstm", choices=("lstm", "gpt"))
    parser.add_argument("--budget", default="90s")
    parser.add_argument("--augment", default="sr=0.1,ri=0.1,rs=0.1,rd=0.1,n=4")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eda-"))
    train = work / "train.tsv"
    sample(args.examples, train)
    results: dict[str, list[float]] = {"none": [], "eda": []}
    for seed in args.seeds:
        for name, extra in (("none", []), ("eda", ["--augment", args.augment])):
            out = work / f"{name}-{seed}"
            cmd = [sys.executable, "-m", "budgetlm", "finetune", "--model", "scratch", "--arch", args.arch,
                   "--data", str(train), "--val", str(SST2 / "dev.tsv"), "--text-column", "sentence",
                   "--label-column", "label", "--budget", args.budget, "--seed", str(seed), "--out", str(out),
                   "--quiet", *extra]
            subprocess.run(cmd, check=True, capture_output=True)
            acc = json.loads((out / "summary.json").read_text())["best_val_accuracy"]
            results[name].append(acc)
            print(f"seed {seed} {name:4s} dev accuracy {acc:.4f}", flush=True)
    print(f"\n| training data ({args.examples} SST-2 examples, {args.arch} from scratch, {args.budget}) | "
          + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
    print("|---|" + "---|" * (len(args.seeds) + 1))
    for name, label in (("none", "no augmentation"), ("eda", f"EDA `{args.augment}`")):
        accs = results[name]
        print(f"| {label} | " + " | ".join(f"{a:.4f}" for a in accs) + f" | **{statistics.mean(accs):.4f}** |")


if __name__ == "__main__":
    main()
