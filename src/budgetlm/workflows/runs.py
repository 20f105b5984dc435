"""`budgetlm runs [DIR]`: the runs under a folder as one table — name, date, architecture, size,
budget, metric, stop reason — best first by their metric (language models by validation bits per
byte, classifiers by validation accuracy)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from budgetlm.budget import format_duration
from budgetlm.errors import UserError

# metric of a run's summary → higher is better; the first one a summary holds is the run's
METRICS = {"best_val_bpb": False, "best_val_accuracy": True}
COLUMNS = ("name", "date", "arch", "size", "budget", "metric", "value", "stop")


def _read(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # a run still writing, or not ours
        return None
    return value if isinstance(value, dict) else None


def _architecture(config: dict, summary: dict) -> str:
    arch = config.get("arch") or "?"
    if arch in ("gpt", "bert", "t5"):
        return f"{arch} {config.get('n_layer')}×{config.get('d_model')}"
    if arch == "classifier":
        members = config.get("members", 1)
        return f"{config.get('body')} classifier" + (f" ×{members}" if members > 1 else "")
    return arch


def _size(params) -> str:
    if not isinstance(params, (int, float)):
        return ""
    return f"{params / 1e6:.2f}M" if params >= 1e5 else f"{params / 1e3:.1f}k"


def _budget(summary: dict) -> str:
    if summary.get("budget_s"):
        return format_duration(summary["budget_s"])
    return f"{summary['steps']} steps" if summary.get("steps") else ""


def describe(folder: Path, root: Path) -> dict | None:
    """One row for the run in `folder`, or None when it holds no finished run."""
    summary = _read(folder / "summary.json")
    if summary is None:
        return None
    config = _read(folder / "config.json") or {}
    metric = next((m for m in METRICS if isinstance(summary.get(m), (int, float))), None)
    label, value = (metric[len("best_"):], summary.get(metric)) if metric else ("", None)
    if metric is None and isinstance(summary.get("best_val_loss"), (int, float)) and summary.get("objective"):
        # a BERT's or T5's loss, named by its objective: ranked only among runs of that objective
        label, value = f"{summary['objective']} val_loss", summary["best_val_loss"]
    return {
        "name": str(folder.relative_to(root)) if folder != root else folder.name,
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime((folder / "summary.json").stat().st_mtime)),
        "arch": _architecture(config, summary),
        "size": _size(summary.get("params")),
        "budget": _budget(summary),
        "metric": label,
        "value": value,
        "stop": summary.get("stop_reason") or "",
        "path": str(folder),
    }


def ranked(rows: list[dict]) -> list[dict]:
    """Grouped by metric (bits per byte first, then accuracy, then each other objective's loss), best first within
    each; runs without a metric last."""
    order = list(METRICS)

    def key(row):
        metric = "best_" + row["metric"] if row["metric"] else None
        if metric is None:
            return (len(order) + 1, "", 0.0)
        if metric not in METRICS:  # an objective's loss: lower is better
            return (len(order), metric, row["value"])
        return (order.index(metric), "", -row["value"] if METRICS[metric] else row["value"])

    return sorted(rows, key=key)


def table(rows: list[dict]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    cells = [["name", "date", "architecture", "size", "budget", "metric", "stop"]]
    for r in rows:
        figure = "" if r["value"] is None else f"{r['metric']} {r['value']:.4f}"
        cells.append([r["name"], r["date"], r["arch"], r["size"], r["budget"], figure, r["stop"]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def run(folder: str | Path = "runs", *, as_json: bool = False) -> list[dict]:
    """Print the runs under `folder` (every folder holding a summary.json, at any depth) and return them."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder; give the folder your runs are in (default: runs/)")
    found = [describe(p.parent, root) for p in sorted(root.rglob("summary.json")) if "checkpoints" not in p.parts]
    rows = ranked([r for r in found if r is not None])
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no runs under {root} (a run folder holds a summary.json)")
    else:
        print(table(rows))
    return rows
