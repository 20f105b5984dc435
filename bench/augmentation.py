"""Does EDA augmentation help a model trained on little labelled data?

    .venv/bin/python bench/augmentation.py [--examples 500] [--seeds 0 1 2] [--arch lstm] [--budget 90s]
    .venv/bin/python bench/augmentation.py --model runs/pretrained [--seeds ...] [-- more finetune flags]

Samples N training examples from SST-2 (stratified, fixed sample), then for each seed fine-tunes with
and without `--augment sr=0.1,ri=0.1,rs=0.1,rd=0.1,n=4`, selecting on and reporting SST-2 dev accuracy:
a model from scratch (`--arch`), or with `--model` a pretrained body (e.g. the one `budgetlm pretrain`
made from the SST-2 training sentences). Prints a Markdown table and the paired difference (results go
into docs/finetune.md)."""

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
    parser.add_argument("--model", default="scratch", help="a pretrained body (a budgetlm pretrain folder or hf:PATH)")
    parser.add_argument("--budget", default="90s")
    parser.add_argument("--augment", default="sr=0.1,ri=0.1,rs=0.1,rd=0.1,n=4")
    parser.add_argument("finetune_args", nargs=argparse.REMAINDER, help="after --: passed to every finetune run")
    args = parser.parse_args()
    more = [a for a in args.finetune_args if a != "--"]
    work = Path(tempfile.mkdtemp(prefix="eda-"))
    train = work / "train.tsv"
    sample(args.examples, train)
    results: dict[str, list[float]] = {"none": [], "eda": []}
    for seed in args.seeds:
        for name, extra in (("none", []), ("eda", ["--augment", args.augment])):
            out = work / f"{name}-{seed}"
            body = ["--model", "scratch", "--arch", args.arch] if args.model == "scratch" else ["--model", args.model]
            cmd = [sys.executable, "-m", "budgetlm", "finetune", *body,
                   "--data", str(train), "--val", str(SST2 / "dev.tsv"), "--text-column", "sentence",
                   "--label-column", "label", "--budget", args.budget, "--seed", str(seed), "--out", str(out),
                   "--quiet", *more, *extra]
            subprocess.run(cmd, check=True, capture_output=True)
            acc = json.loads((out / "summary.json").read_text())["best_val_accuracy"]
            results[name].append(acc)
            print(f"seed {seed} {name:4s} dev accuracy {acc:.4f}", flush=True)
    model = f"{args.arch} from scratch" if args.model == "scratch" else f"from {args.model}"
    model += "".join(f" {a}" for a in more)
    print(f"\n| training data ({args.examples} SST-2 examples, {model}, {args.budget}) | "
          + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
    print("|---|" + "---|" * (len(args.seeds) + 1))
    for name, label in (("none", "no augmentation"), ("eda", f"EDA `{args.augment}`")):
        accs = results[name]
        print(f"| {label} | " + " | ".join(f"{a:.4f}" for a in accs) + f" | **{statistics.mean(accs):.4f}** |")
    gains = [e - n for e, n in zip(results["eda"], results["none"])]
    if len(gains) > 1:
        error = statistics.stdev(gains) / len(gains) ** 0.5
        print(f"\nEDA minus none, paired by seed: {statistics.mean(gains):+.4f} ± {error:.4f} (standard error); "
              f"EDA ahead in {sum(g > 0 for g in gains)} of {len(gains)} seeds")


if __name__ == "__main__":
    main()
