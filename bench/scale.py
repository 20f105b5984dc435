"""Time and peak memory of each stage of pretraining and evaluation on corpora of growing size.

    .venv/bin/python bench/scale.py [--sizes 10 100 1000] [--budget 5m] [--workdir /tmp/budgetlm-scale]
                                    [--eval-mb 100] [--out table.md]

Each corpus (sizes in MB) repeats and shuffles the lines of the public-domain texts in ../shared/data
(tinyshakespeare, WikiText-2), seeded; repetition does not matter for memory and time. For each one, in fresh
processes and a fresh token cache: `budgetlm pretrain --budget B` cold (tokenizer training and encoding, from its
log; when training starts, from the step-0 evaluation; wall clock ÷ budget; peak resident memory), the same run
again with the caches warm, and `budgetlm eval` of the run's model on the corpus' first `--eval-mb` MB. Writes a
markdown table (stdout, or --out). The corpora are deleted at the end unless --keep."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SOURCES = ("tinyshakespeare/input.txt", "wikitext2/wiki.txt")

MEASURE = """
import json, resource, subprocess, sys, time
started = time.time()
done = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=open(sys.argv[1], "w"))
print(json.dumps({"wall_s": time.time() - started, "rc": done.returncode,
                  "peak_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}))
"""


def build_corpus(path: Path, megabytes: int) -> None:
    lines = [line for name in SOURCES for line in (DATA / name).read_text(encoding="utf-8").splitlines()]
    rng, size = random.Random(0), 0
    with path.open("w", encoding="utf-8") as f:
        while size < megabytes * 1_000_000:
            rng.shuffle(lines)
            block = "\n".join(lines) + "\n"
            f.write(block)
            size += len(block.encode())


def measure(log: Path, command: list[str], env: dict) -> dict:
    """Wall seconds, peak resident GB and exit code of `command` in a fresh process (its own measurer, so the
    peak is its own)."""
    done = subprocess.run([sys.executable, "-c", MEASURE, str(log), *command], capture_output=True, text=True,
                          env=env, check=True)
    return json.loads(done.stdout)


def pretrain_stages(run: Path, log: Path) -> dict:
    text = log.read_text()
    seconds = {name: float(m.group(1)) if (m := re.search(pattern, text)) else 0.0
               for name, pattern in (("tokenizer_s", r"tokenizer in ([\d.]+)s"), ("encode_s", r"encoded .* in ([\d.]+)s"))}
    first_eval = None
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "eval":
                first_eval = record["elapsed_s"]
                break
    return {**seconds, "train_starts_s": first_eval}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000], help="corpus sizes in MB")
    parser.add_argument("--budget", default="5m")
    parser.add_argument("--eval-mb", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/budgetlm-scale"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the corpora and runs")
    args = parser.parse_args()
    from budgetlm.budget import parse_duration

    budget_s = parse_duration(args.budget)
    args.workdir.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "budgetlm"]
    rows = []
    for megabytes in args.sizes:
        folder = args.workdir / f"{megabytes}mb"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        corpus = folder / "corpus.txt"
        started = time.time()
        build_corpus(corpus, megabytes)
        print(f"built {megabytes} MB in {time.time() - started:.0f}s", file=sys.stderr)
        env = {**os.environ, "BUDGETLM_CACHE": str(folder / "cache")}
        for warm in (False, True):
            run, log = folder / f"run{int(warm)}", folder / f"pretrain{int(warm)}.log"
            result = measure(log, [*cli, "pretrain", "--data", str(corpus), "--budget", args.budget, "--out", str(run)],
                             env)
            rows.append({"corpus_mb": megabytes, "stage": "pretrain, caches " + ("warm" if warm else "cold"),
                         **result, **pretrain_stages(run, log), "budget_s": budget_s})
            print(rows[-1], file=sys.stderr)
        sample = folder / "eval.txt"
        with corpus.open("rb") as f, sample.open("wb") as g:
            g.write(f.read(args.eval_mb * 1_000_000))
        result = measure(folder / "eval.log", [*cli, "eval", "--model", str(folder / "run0"), "--data", str(sample)], env)
        rows.append({"corpus_mb": megabytes, "stage": f"eval of {min(args.eval_mb, megabytes)} MB", **result})
        print(rows[-1], file=sys.stderr)
        if not args.keep:
            shutil.rmtree(folder)
    table = render(rows, args.budget)
    if args.out:
        args.out.write_text(table)
    print(table)


def render(rows: list[dict], budget: str) -> str:
    def cell(value, fmt="{:.1f}"):
        return "" if value is None else fmt.format(value)

    lines = [(f"`bench/scale.py --budget {budget}` on {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"),
             "",
             "| corpus | stage | exit | wall s | wall ÷ budget | tokenizer s | encoding s | training starts at s | peak GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["wall_s"] / r["budget_s"] if "budget_s" in r else None
        lines.append(f"| {r['corpus_mb']} MB | {r['stage']} | {r['rc']} | {r['wall_s']:.1f} | {cell(ratio, '{:.3f}')} | "
                     f"{cell(r.get('tokenizer_s'))} | {cell(r.get('encode_s'))} | {cell(r.get('train_starts_s'))} | "
                     f"{r['peak_gb']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
