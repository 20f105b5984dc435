"""`budgetlm compare`: train several variants of one config on the same data and budget, one after
another, and report them side by side.

Variants come from `--vary KEY=V1,V2,...` (repeatable: the cartesian product of the axes; KEY is any
field of the [data], [model] or [train] sections, with _ or -) or from a sweep file of `[[variant]]`
tables:

    [[variant]]
    name = "muon-fast"          # optional; default: the settings, like optim=muon,lr=0.01
    optim = "muon"              # flat keys of any section...
    lr = 0.01
    [variant.model]             # ...or keys under [variant.data], [variant.model], [variant.train]
    n_layer = 4

Each variant runs with `pretrain.run` in OUT/<name>/ (its log in pretrain.log there), after an
untimed warm-up that keeps one-time costs (tokenizer training, imports) out of the first variant's
budget; OUT gets compare.json, compare.md and compare.png.

Variants rank by validation bits per byte, or by val_loss where none predicts the next token (a BERT's masked
tokens, a T5's spans: bits per byte are not defined there); variants of different objectives rank only by a
metric named with --metric, since their losses measure different things."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import time
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from budgetlm import tracking
from budgetlm.budget import format_duration
from budgetlm.config import (
    WARM_UP,
    RunConfig,
    load_toml,
    normalize_key,
    section_of,
    setting,
    value_types,
    with_overrides,
)
from budgetlm.errors import UserError
from budgetlm.models.registry import OBJECTIVES
from budgetlm.eval.validation import final_record, validation_label
from budgetlm.train.checkpoint import atomic_write_bytes
from budgetlm.workflows import pretrain
from budgetlm.report import prepare_out, run_quietly, say

LIMITS = ("budget", "budget_flops", "max_steps", "max_tokens")


@dataclass
class Variant:
    name: str
    settings: dict          # config key → value, as applied over the base config
    config: RunConfig

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9._=,+-]", "_", self.name)


# ---------------------------------------------------------------- values

def parse_value(cfg: RunConfig, key: str, text: str):
    """Command-line text → a value for `key`: kept as text for text fields, else read as a TOML
    literal (1e-3, 4, true); what stays unreadable goes to config.apply, which names the problem."""
    if str in value_types(cfg, key):
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# ---------------------------------------------------------------- variants

def variants(base: RunConfig, *, vary: list[str] | None = None, sweep: str | None = None) -> list[Variant]:
    """The variants of `--vary` axes or of a sweep file, each validated, before anything runs."""
    if vary and sweep:
        raise UserError("give --vary or --sweep, not both")
    if not vary and not sweep:
        raise UserError("give the variants: --vary KEY=V1,V2,... (repeatable) or --sweep FILE.toml")
    found = variants_from_vary(base, vary) if vary else variants_from_sweep(base, sweep)
    names = [v.name for v in found]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise UserError(f"variant names must differ; repeated: {', '.join(duplicated)}")
    folders = [v.folder for v in found]
    if len(set(folders)) != len(folders):
        raise UserError("variant names must differ in their letters, digits and ._=,+- (they name the run folders)")
    for v in found:
        t = v.config.train
        if not any(getattr(t, limit) for limit in LIMITS):
            raise UserError(f"variant {v.name}: give a limit, e.g. --budget 60s (or --budget-flops, --max-steps, --max-tokens)")
    return found


def variants_from_vary(base: RunConfig, specs: list[str]) -> list[Variant]:
    axes: dict[str, list[tuple[str, object]]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        texts = [v.strip() for v in values.split(",")]
        if not sep or not key.strip() or not all(texts):
            raise UserError(f"--vary {spec!r}: write KEY=V1,V2,..., e.g. optim=adamw,muon "
                            "(values with commas need a --sweep file)")
        name = normalize_key(base, key, f"--vary {spec!r}: ")
        if name in axes:
            raise UserError(f"--vary: {name} is given twice; put all its values in one --vary {name}=V1,V2,...")
        if len(set(texts)) != len(texts):
            raise UserError(f"--vary {spec!r}: a value is repeated")
        axes[name] = [(text, parse_value(base, name, text)) for text in texts]
    found = []
    for combo in itertools.product(*axes.values()):
        raw = {key: value for key, (_, value) in zip(axes, combo)}
        cfg = with_overrides(base, raw, "--vary ")
        settings = {key: setting(cfg, key) for key in raw}
        name = ",".join(f"{key}={text}" for key, (text, _) in zip(axes, combo))
        found.append(Variant(name, settings, cfg))
    return found


def variants_from_sweep(base: RunConfig, path: str) -> list[Variant]:
    doc = load_toml(path)
    extra = sorted(set(doc) - {"variant"})
    tables = doc.get("variant")
    if extra or not isinstance(tables, list) or not tables:
        raise UserError(f"{path}: a sweep file holds [[variant]] tables only (name = \"...\" plus config keys)"
                        + (f"; found {', '.join(extra)}" if extra else ""))
    found = []
    for i, table in enumerate(tables, 1):
        where = f"{path} variant {i}: "
        table = dict(table)
        name = table.pop("name", None)
        settings: dict = {}
        for key, value in table.items():
            if key in [f.name for f in fields(base)] and isinstance(value, dict):
                for inner in value:
                    if section_of(base, inner.replace("-", "_")) != key:
                        raise UserError(f"{where}{inner!r} is not a key of [{key}]; allowed: "
                                        f"{', '.join(f.name for f in fields(getattr(base, key)))}")
                settings.update(value)
            else:
                settings[key] = value
        cfg = with_overrides(base, settings, where)
        settings = {k.replace("-", "_"): v for k, v in settings.items()}
        settings = {k: setting(cfg, k) for k in settings}
        if name is None:
            name = ",".join(f"{k}={_text(v)}" for k, v in settings.items()) or "base"
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{where}name must be a non-empty string")
        found.append(Variant(name.strip(), settings, cfg))
    return found


def _text(value) -> str:
    if isinstance(value, list):
        return "+".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


# ---------------------------------------------------------------- running

def ranking_metric(found: list[Variant], metric: str | None) -> str:
    """The validation figure the variants rank by: `metric` where given, else val_bpb for next-token models and
    val_loss for the others; refused where the variants' objectives differ and no metric was named."""
    objectives = sorted({OBJECTIVES[v.config.model.arch] for v in found})
    if metric is None:
        if len(objectives) > 1:
            raise UserError(f"the variants train different objectives ({', '.join(objectives)}), whose validation "
                            "figures measure different things; give --metric val_loss to rank them by it anyway")
        return "val_bpb" if objectives == ["causal_lm"] else "val_loss"
    if metric == "val_bpb" and objectives != ["causal_lm"]:
        raise UserError("--metric val_bpb: bits per byte are defined for next-token models (--arch gpt) only; "
                        "use --metric val_loss")
    return metric


def run(base: RunConfig, found: list[Variant], out: Path, metric: str | None = None) -> list[dict]:
    """Run every variant in turn; write compare.json after each, then compare.md and compare.png.
    Raises UserError (after writing the files) only when every variant failed."""
    metric = ranking_metric(found, metric)
    tracking.require(base.train.report_to)  # before the warm-up and every variant
    prepare_out(out)
    say("warming up (imports, tokenizer, token cache) outside the budgets")
    run_quietly(pretrain.run, with_overrides(found[0].config, WARM_UP), out / ".warm-up")
    records: list[dict] = []
    for i, variant in enumerate(found, 1):
        say(f"[{i}/{len(found)}] {variant.name}: running in {out / variant.folder}")
        record = run_variant(variant, out / variant.folder)
        records.append(record)
        say(f"[{i}/{len(found)}] {variant.name}: {_outcome(record, metric)}")
        atomic_write_bytes(out / "compare.json", json.dumps(records, indent=2).encode())
        if record["stop_reason"] == "interrupted":
            say(f"interrupted: {len(found) - i} variant(s) not run")
            break
    report = markdown(base, records, metric)
    atomic_write_bytes(out / "compare.md", report.encode())
    plot(records, out / "compare.png", metric)
    print(report, flush=True)
    say(f"files in {out}: compare.json, compare.md, compare.png")
    if all(r["error"] for r in records):
        raise UserError(f"every variant failed; see {out / 'compare.md'} and each variant's pretrain.log")
    return records


def run_variant(variant: Variant, folder: Path) -> dict:
    """One pretrain run, its log in folder/pretrain.log; a failure becomes the record's error."""
    record = {"name": variant.name, "settings": variant.settings, "run": str(folder), "best_val_bpb": None,
              "best_val_loss": None, "start_val_loss": None, "tokens_seen": None, "tokens_per_s": None,
              "wall_s": None, "steps": None, "params": None, "model": None, "stop_reason": "failed", "device": None,
              "error": None}
    started = time.monotonic()
    try:
        prepare_out(folder)
        with (folder / "pretrain.log").open("w") as log, contextlib.redirect_stderr(log), \
                tracking.scope(folder.parent, f"compare {folder.parent.resolve().name}", variant.name):
            summary = pretrain.run(variant.config, folder, quiet=True)
    except UserError as e:
        record.update(error=str(e), wall_s=round(time.monotonic() - started, 2))
        return record
    except Exception as e:  # unforeseen: keep it with the variant so the others still run
        record.update(error=f"{type(e).__name__}: {e}", wall_s=round(time.monotonic() - started, 2))
        return record
    evals = eval_records(folder / "metrics.jsonl", metric="val_loss")
    start = next((e for e in evals if e.get("step") == 0), None)
    record.update({key: summary.get(key) for key in ("best_val_bpb", "best_val_loss", "tokens_seen", "tokens_per_s",
                                                  "wall_s", "steps", "params", "stop_reason", "device")})
    record["start_val_loss"] = start["val_loss"] if start else None
    m = summary["model"]
    record["model"] = f"{m['n_layer']}×{m['d_model']}, context {m['context']}"
    return record


def eval_records(path: Path, kind: str = "eval", metric: str = "val_bpb") -> list[dict]:
    """The `kind: eval` records (or those of another kind: "final") of a run's metrics.jsonl with a
    `metric` (lines cut short by a kill are skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == kind and record.get(metric) is not None:
            records.append(record)
    return records


def _outcome(record: dict, metric: str = "val_bpb") -> str:
    if record["error"]:
        return f"failed: {record['error']}"
    return (f"best {_label(metric)} {record['best_' + metric]:.4f} (loss {record['start_val_loss'] or math.nan:.3f} → "
            f"{record['best_val_loss']:.3f}), {record['tokens_seen']:,} tokens at {record['tokens_per_s']:,.0f}/s, "
            f"{format_duration(record['wall_s'])}, {record['stop_reason']}")


# ---------------------------------------------------------------- reports

def _label(metric: str) -> str:
    return metric.replace("_", " ")


def ranked(records: list[dict], metric: str = "val_bpb") -> list[dict]:
    """Best validation `metric` first; failed variants last, in their order."""
    key = f"best_{metric}"
    return sorted(records, key=lambda r: (r.get(key) is None, r.get(key) or 0.0))


def markdown(base: RunConfig, records: list[dict], metric: str = "val_bpb") -> str:
    t = base.train
    limit = " / ".join(f"{name.replace('_', ' ')} {_limit(getattr(t, name))}" for name in LIMITS if getattr(t, name))
    varied = sorted({k for r in records for k in r["settings"] if k in LIMITS})
    data = ", ".join(base.data.data) or "Shakespeare's complete works (default corpus)"
    device = next((r["device"] for r in records if r["device"]), "unknown")
    lines = [
        "# budgetlm compare",
        "",
        (f"Each variant: {limit or 'no limit'}{' (varied: ' + ', '.join(varied) + ')' if varied else ''}; "
         f"data: {data}; machine: {device}; {time.strftime('%Y-%m-%d %H:%M')}."),
        "",
        ("| rank | variant | best val bpb | best val loss | start val loss | tokens seen | tokens/s | wall | stop "
         "| model |"),
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for rank, r in enumerate(ranked(records, metric), 1):
        name = r["name"].replace("|", "\\|")
        if r["error"]:
            error = r["error"].replace("|", "\\|")
            lines.append(f"| – | {name} | | | | | | | failed: {error} | |")
            continue
        lines.append(f"| {rank} | {name} | {_number(r['best_val_bpb'], '.4f')} | {r['best_val_loss']:.4f} | "
                     f"{_number(r['start_val_loss'], '.4f')} | {r['tokens_seen']:,} | {r['tokens_per_s']:,.0f} | "
                     f"{r['wall_s']:.1f}s | {r['stop_reason']} | {r['model']} |")
    return "\n".join(lines) + "\n"


def _limit(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)  # 3e+15 FLOPs, not 3000000000000000.0


def _number(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def plot(records: list[dict], path: Path, metric: str = "val_bpb") -> None:
    """Validation `metric` against wall-clock seconds, one line per variant (from its metrics.jsonl)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    later = []  # evaluations after the first, to keep the untrained start from flattening the curves
    drawn = False
    periodic = []  # every variant's evaluations during training
    for r in ranked(records, metric):
        evals = eval_records(Path(r["run"]) / "metrics.jsonl", metric=metric)
        if r["error"] or not evals:
            continue
        line, = ax.plot([e["elapsed_s"] for e in evals], [e[metric] for e in evals], "o-", ms=3, lw=1.2,
                        label=f"{r['name']} ({r['best_' + metric]:.3f})")
        later += [e[metric] for e in evals[1:]]
        periodic += evals
        final = final_record(eval_records(Path(r["run"]) / "metrics.jsonl", kind="final", metric=metric))
        if final is not None:  # the reported figure: the kept weights on the whole validation split
            ax.plot([final["elapsed_s"]], [final[metric]], "*", ms=12, color=line.get_color())
            later.append(final[metric])
        drawn = True
    if later:
        low, high = min(later), max(later)
        ax.set_ylim(low - 0.05 * (high - low + 1e-3), high + 0.1 * (high - low + 1e-3))
    if drawn:
        ax.plot([], [], "*", ms=10, color="gray", label="final: whole validation split (as reported)")
        ax.plot([], [], "o-", ms=3, lw=1.2, color="gray", label=validation_label(periodic))
        ax.legend(title=f"variant (best {_label(metric)}, the ★)", fontsize=8)
    ax.set_xlabel("wall-clock seconds")
    ax.set_ylabel("validation bits per byte" if metric == "val_bpb" else f"validation {_label(metric)}")
    ax.set_title("budgetlm compare")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
