"""Is the planned size the right one? For each corpus and budget: pretrain the planned model, then the same
budget at other multiples of the planned parameter count (the other settings by the plan's own rules for that
shape: context, batch, learning rate, dropout, BPE-dropout), and write a markdown table of best_val_bpb per
size, the plan's regret against the best size, and each run's wall-clock over its budget.

    .venv/bin/python bench/planner_regret.py --out runs/regret                      # the issue's sweep (hours)
    .venv/bin/python bench/planner_regret.py --sweep PATH:20s:0.5 --out /tmp/regret # one small sweep

A sweep is CORPUS:BUDGET[:SCALES], scales comma-separated (1 is the plan itself and is always run)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from budgetlm.budget import Budget, parse_duration
from budgetlm.config import DataConfig, RunConfig
from budgetlm.plan import bpe_passes, plan_on_device
from budgetlm.prepare import prepare
from budgetlm.train.runtime import device_name, pick_device, pick_precision, set_threads

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TINYSHAKESPEARE = str(SHARED / "tinyshakespeare" / "input.txt")
WIKITEXT2 = str(SHARED / "wikitext2" / "wiki.txt")
SCALES = (0.25, 0.5, 2.0, 4.0)
ISSUE_SWEEPS = [f"{c}:{b}:0.25,0.5,2,4" for c in (TINYSHAKESPEARE, WIKITEXT2) for b in ("1m", "5m")] + \
    [f"{TINYSHAKESPEARE}:20m:0.5,2"]


def scaled_shape(n_layer: int, d_model: int, scale: float) -> tuple[int, int, int]:
    """A shape with about `scale` × the body parameters of n_layer × d_model, grown as the ladder grows (width
    by the cube root, depth the rest), width a multiple of 32 and heads of 64 (at least one)."""
    width = max(32, 32 * round(d_model * scale ** (1 / 3) / 32))
    depth = max(1, round(scale * n_layer * d_model**2 / width**2))
    heads = max(1, width // 64)
    while width % heads:
        heads -= 1
    return depth, width, heads


def settings_for(shape: tuple[int, int, int], budget_s: float, text, device, precision: str) -> list[str]:
    """The pretrain flags that give `shape` the settings the plan's rules give it at this budget (a run given its
    shape plans nothing, so every planned setting is passed)."""
    p = plan_on_device(budget_s, train_tokens=text.unique_tokens, vocab=text.tokenizer.get_vocab_size(),
                       device=device, precision=precision, ladder=[shape])
    return ["--n-layer", str(p.n_layer), "--d-model", str(p.d_model), "--n-head", str(p.n_head),
            "--context", str(p.context), "--batch-tokens", str(p.batch_tokens), "--micro-batch", str(p.micro_batch),
            "--lr", repr(p.lr), "--dropout", repr(p.dropout), "--bpe-dropout", repr(p.bpe_dropout),
            "--bpe-passes", str(bpe_passes(p.expected_epochs)), "--canon", str(p.canon), "--ema", repr(p.ema)]


def pretrain(corpus: str, budget: str, flags: list[str], out: Path) -> dict:
    """One pretrain process; its summary and its wall-clock from process start to exit."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "budgetlm", "pretrain", "--data", corpus, "--budget", budget,
                           "--out", str(out), "--quiet", *flags], capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}",
                "process_s": wall}
    summary = json.loads((out / "summary.json").read_text())
    return {**summary, "process_s": wall}


def sweep(spec: str, out: Path, device, precision: str) -> list[dict]:
    corpus, budget, scales_text = (spec.split(":") + [""])[:3]
    scales = [float(x) for x in scales_text.split(",")] if scales_text else list(SCALES)
    budget_s = parse_duration(budget)
    text = prepare(RunConfig(data=DataConfig(data=[corpus])), Budget(seconds=budget_s), resumed_tokenizer=None,
                   device=device, precision=precision)
    name = Path(corpus).parent.name or Path(corpus).stem
    rows = []
    planned = pretrain(corpus, budget, [], out / f"{name}-{budget}-planned")
    if "error" in planned:
        raise SystemExit(f"{spec}: the planned run failed: {planned['error']}")
    m = planned["model"]
    rows.append({"corpus": name, "budget": budget, "scale": 1.0, "shape": f"{m['n_layer']}x{m['d_model']}",
                 "params": planned["params"], "best_val_bpb": planned["best_val_bpb"],
                 "wall_ratio": planned["process_s"] / budget_s, "planned": True})
    print(f"{name} {budget} planned {rows[-1]['shape']}: {planned['best_val_bpb']:.4f}", flush=True)
    for scale in sorted(scales):
        if scale == 1:
            continue
        shape = scaled_shape(m["n_layer"], m["d_model"], scale)
        summary = pretrain(corpus, budget, settings_for(shape, budget_s, text, device, precision),
                           out / f"{name}-{budget}-x{scale:g}")
        row = {"corpus": name, "budget": budget, "scale": scale, "shape": f"{shape[0]}x{shape[1]}",
               "params": summary.get("params"), "best_val_bpb": summary.get("best_val_bpb"),
               "wall_ratio": summary["process_s"] / budget_s, "planned": False, "error": summary.get("error")}
        rows.append(row)
        print(f"{name} {budget} x{scale:g} {row['shape']}: {row['best_val_bpb'] or row['error']}", flush=True)
    return rows


def markdown(rows: list[dict], device: str) -> str:
    lines = [(f"Planner regret ({device}, {time.strftime('%Y-%m-%d')}): best_val_bpb by multiple of the planned "
              "parameter count; regret = plan ÷ best − 1; wall = process wall-clock ÷ budget."), "",
             "| corpus | budget | size | shape | params | best_val_bpb | wall / budget |",
             "|---|---|---:|---|---:|---:|---:|"]
    for (corpus, budget), group in _groups(rows):
        for r in sorted(group, key=lambda r: r["scale"]):
            bpb = f"{r['best_val_bpb']:.4f}" if r["best_val_bpb"] is not None else f"failed: {r.get('error')}"
            size = f"**{r['scale']:g}× (plan)**" if r["planned"] else f"{r['scale']:g}×"
            params = f"{r['params'] / 1e6:.2f}M" if r["params"] else ""
            lines.append(f"| {corpus} | {budget} | {size} | {r['shape']} | {params} | {bpb} | {r['wall_ratio']:.3f} |")
    lines += ["", "| corpus | budget | plan | best size | regret |", "|---|---|---:|---:|---:|"]
    for (corpus, budget), group in _groups(rows):
        done = [r for r in group if r["best_val_bpb"] is not None]
        plan_row = next(r for r in group if r["planned"])
        best = min(done, key=lambda r: r["best_val_bpb"])
        regret = plan_row["best_val_bpb"] / best["best_val_bpb"] - 1
        lines.append(f"| {corpus} | {budget} | {plan_row['best_val_bpb']:.4f} | {best['scale']:g}× "
                     f"{best['best_val_bpb']:.4f} | {regret:+.2%} |")
    return "\n".join(lines) + "\n"


def _groups(rows: list[dict]):
    keys = list(dict.fromkeys((r["corpus"], r["budget"]) for r in rows))
    return [(k, [r for r in rows if (r["corpus"], r["budget"]) == k]) for k in keys]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="append", help="CORPUS:BUDGET[:SCALES] (default: the issue's sweeps)")
    ap.add_argument("--out", required=True, help="folder for the runs, regret.md and regret.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    set_threads(None)
    device = pick_device("auto")
    precision = pick_precision("auto", device)
    rows = []
    for spec in args.sweep or ISSUE_SWEEPS:
        rows += sweep(spec, out, device, precision)
        (out / "regret.json").write_text(json.dumps(rows, indent=1))
    report = markdown(rows, device_name(device))
    (out / "regret.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
