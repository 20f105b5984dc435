"""`budgetlm tune`: hyperparameter search with Optuna within a total budget.

The search space is the `[tune]` table of the config TOML, one entry per config key:

    [tune]
    lr = {low = 1e-4, high = 1e-2, log = true}   # a range: float, or int when the key takes ints
    n_layer = {low = 2, high = 6}                #   and both ends are ints; optional step
    optim = ["adamw", "muon"]                    # a list: choices
    lr_factor = {low = 0.25, high = 4, log = true}

`lr_factor` is the one key that is not a config field: it multiplies the configured learning rate, or
the planned one for the trial's width and optimizer (plan.learning_rate), so "around the default"
means the same for every optimizer. Without a [tune] table, DEFAULT_SPACE is searched.

Trial 0 runs the config as given (each searched key at its configured value where the space holds
it), so the best trial is never worse than the starting point, up to run-to-run noise. Then a TPE
sampler seeded by --seed proposes the trials, and a median pruner stops a trial whose validation bpb
at an evaluation is worse than the median of earlier trials at the same evaluation. No trial starts
unless the rest of the total budget holds a whole trial."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna

from budgetlm import tracking
from budgetlm.budget import format_duration, parse_duration
from budgetlm.config import (
    WARM_UP,
    RunConfig,
    apply,
    load_toml,
    normalize_key,
    resolve,
    setting,
    to_toml,
    value_types,
    with_overrides,
)
from budgetlm.plan import learning_rate, model_for
from budgetlm.errors import UserError
from budgetlm.train.checkpoint import atomic_write_bytes
from budgetlm.workflows import pretrain
from budgetlm.report import prepare_out, run_quietly, say

LR_FACTOR = "lr_factor"

# Searched when the config has no [tune] table: the knobs that matter most at a fixed budget, each
# around its default (lr ×¼…×4, warmup 0…10% of the budget, decay 0…0.2, the planner's batch or
# 4× / 16× a CPU-sized one).
DEFAULT_SPACE = {
    "optim": ["adamw", "muon", "lamb"],
    LR_FACTOR: {"low": 0.25, "high": 4.0, "log": True},
    "warmup": {"low": 0.0, "high": 0.1},
    "weight_decay": {"low": 0.0, "high": 0.2},
    "batch_tokens": ["auto", "4096", "16384"],
}

# TPE samples at random for its first trials (Optuna's default of 10 would leave a 10-minute search
# of 60 s trials random throughout); the pruner waits for 3 finished trials and the 5th evaluation,
# since early evaluations mostly reflect warmup and learning rate, not the final loss.
STARTUP_TRIALS = 4
PRUNER_STARTUP_TRIALS = 3
PRUNER_WARMUP_EVALS = 4
REPORT_RESERVE_S = 5.0     # kept back from the total budget for writing the reports
TRIAL_OVERRUN = 1.05       # a trial may run a little past its budget (final evaluation, saving)


@dataclass(frozen=True)
class Param:
    """One searched key: choices, or a float/int range (optionally log-scaled or stepped)."""
    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    def suggest(self, trial: optuna.Trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if self.integer:
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def holds(self, value) -> bool:
        if self.choices is not None:
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.integer and not float(value).is_integer():
            return False
        return not self.step or float((value - self.low) / self.step).is_integer()

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name} ∈ {{{', '.join(map(str, self.choices))}}}"
        scale = "log" if self.log else "int" if self.integer else "uniform"
        return f"{self.name} ∈ [{self.low:g}, {self.high:g}] ({scale}{f', step {self.step:g}' if self.step else ''})"


# ---------------------------------------------------------------- config and space

def load_config(toml_path: str | None, flags: dict, sections: dict[str, type]) -> tuple[RunConfig, dict | None]:
    """config.resolve for a TOML that may also hold a [tune] table (which resolve rejects):
    defaults ← the TOML's sections ← flags; and the [tune] table, if any."""
    doc = load_toml(toml_path) if toml_path else {}
    table = doc.pop("tune", None)
    if table is not None and not isinstance(table, dict):
        raise UserError(f"{toml_path}: tune must be a table, like [tune]")
    base = RunConfig()
    for name, values in doc.items():
        if name not in sections:
            allowed = ", ".join(f"[{s}]" for s in (*sections, "tune"))
            raise UserError(f"{toml_path}: unknown table [{name}]; allowed: {allowed}")
        if not isinstance(values, dict):
            raise UserError(f"{toml_path}: {name} must be a table, like [{name}]")
        apply(getattr(base, name), values, where=f"{toml_path} [{name}] ")
    return resolve(lambda: base, sections, None, flags), table


def parse_space(table: dict, base: RunConfig, where: str = "[tune] ") -> list[Param]:
    """Validate a [tune] table against the config: known keys, well-formed ranges, and values that
    config.apply accepts (each choice and both ends of each range are tried on `base`)."""
    if not table:
        raise UserError(f"{where}is empty; give at least one key to search, "
                        "e.g. lr = {low = 1e-4, high = 1e-2, log = true}")
    space = []
    for key, spec in table.items():
        name = LR_FACTOR if key.replace("-", "_") == LR_FACTOR else normalize_key(base, key, where)
        at = f"{where}{name}: "
        if isinstance(spec, list):
            if not spec or len(set(map(repr, spec))) != len(spec):
                raise UserError(f"{at}give a list of different choices")
            if not all(isinstance(v, (bool, int, float, str)) for v in spec):
                raise UserError(f"{at}choices must be numbers, strings or booleans")
            param = Param(name, choices=tuple(spec))
        elif isinstance(spec, dict):
            param = _range(name, spec, base, at)
        else:
            raise UserError(f"{at}give a list of choices or a range like {{low = 1, high = 8}}, not {spec!r}")
        if name != LR_FACTOR:
            for value in param.choices or (param.low, param.high):
                with_overrides(base, {name: value}, at)
        space.append(param)
    names = {p.name for p in space}
    if LR_FACTOR in names and "lr" in names:
        raise UserError(f"{where}search lr or lr_factor, not both")
    return space


def _range(name: str, spec: dict, base: RunConfig, at: str) -> Param:
    unknown = sorted(set(spec) - {"low", "high", "log", "step"})
    if unknown or "low" not in spec or "high" not in spec:
        raise UserError(f"{at}a range has low, high and optionally log and step; "
                        + (f"unknown: {', '.join(unknown)}" if unknown else "low and high are required"))
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    numbers = (low, high) + ((step,) if step is not None else ())
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) or not isinstance(log, bool):
        raise UserError(f"{at}low, high and step must be numbers and log true or false")
    if not low < high:
        raise UserError(f"{at}low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise UserError(f"{at}a log range needs low > 0")
    if log and step is not None:
        raise UserError(f"{at}a range is either log or stepped, not both")
    takes_float = name == LR_FACTOR or float in value_types(base, name)
    integer = all(isinstance(v, int) for v in numbers) and not takes_float
    return Param(name, low=low, high=high, log=log, step=step, integer=integer)


def baseline_params(space: list[Param], base: RunConfig) -> dict:
    """Trial 0: each searched key at the base config's value, where the space holds it."""
    params = {}
    for p in space:
        if p.name == LR_FACTOR:
            value = 1.0
        else:
            value = setting(base, p.name)
            if value is None and p.choices is not None and "auto" in p.choices:
                value = "auto"  # an unset value means the automatic choice
        if p.holds(value):
            params[p.name] = value
    return params


# ---------------------------------------------------------------- search

@dataclass
class TrialResult:
    number: int
    params: dict
    settings: dict
    state: str                 # complete | pruned | failed
    best_val_bpb: float | None
    best_val_loss: float | None
    wall_s: float
    stop_reason: str | None
    run: str
    error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def score(self) -> float | None:
        """What trials are ranked by: bits per byte, or the loss where the objective has none (--arch bert, t5)."""
        return self.best_val_bpb if self.best_val_bpb is not None else self.best_val_loss


def _metric(base: RunConfig) -> str:
    return "val_bpb" if base.model.arch == "gpt" else "val_loss"


def _label(metric: str) -> str:
    return "bits/byte" if metric == "val_bpb" else "val_loss"


def run(base: RunConfig, space: list[Param], out: Path, *, total_budget: str | None = None,
        trial_budget: str | None = None, trials: int | None = None,
        pruner: optuna.pruners.BasePruner | None = None) -> dict:
    """Search until `trials` trials ran or the total budget cannot hold another; write best.toml,
    trials.json, trials.md and tune.png to `out`. Returns {best_trial, best_val_bpb (or best_val_loss for an
    objective without bits per byte), trials}."""
    if any(p.name == "arch" for p in space):
        raise UserError("the search space varies arch, whose objectives' losses are not comparable; tune one "
                        "architecture, or compare them with budgetlm compare --vary arch=... --metric val_loss")
    started = time.monotonic()
    total_s = parse_duration(total_budget) if total_budget else None
    if trial_budget:
        base = with_overrides(base, {"budget": trial_budget}, "--trial-budget: ")
    t = base.train
    if not (t.budget or t.max_steps or t.max_tokens):
        raise UserError("give each trial a limit: --trial-budget 60s (or --max-steps, --max-tokens)")
    trial_s = t.budget
    if total_s is None and not trials:
        raise UserError("give --total-budget (e.g. 30m) or --trials N")
    if trials is not None and trials < 1:
        raise UserError(f"--trials {trials}: give at least 1")
    if total_s is not None and trial_s is not None and total_s < trial_s * TRIAL_OVERRUN + REPORT_RESERVE_S:
        raise UserError(f"the total budget {format_duration(total_s)} cannot hold one trial of "
                        f"{format_duration(trial_s)}; give a larger --total-budget or a smaller --trial-budget")
    tracking.require(t.report_to)  # before the warm-up and every trial
    prepare_out(out)
    say("warming up (imports, tokenizer, token cache) outside the budgets")
    run_quietly(pretrain.run, with_overrides(base, WARM_UP), out / ".warm-up")  # or trial 0 would pay them

    results: list[TrialResult] = []
    configs: dict[int, RunConfig] = {}
    planned_width = None  # the planner's d_model, learnt from a trial that let it choose
    say(f"budgetlm tune: searching {'; '.join(p.describe() for p in space)}")
    with _optuna_quiet():
        study = optuna.create_study(
            direction="minimize", sampler=optuna.samplers.TPESampler(seed=t.seed, n_startup_trials=STARTUP_TRIALS),
            pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                                         n_warmup_steps=PRUNER_WARMUP_EVALS))
        study.enqueue_trial(baseline_params(space, base))
        while trials is None or len(results) < trials:
            longest = trial_s or max((r.wall_s for r in results), default=0.0)
            left = None if total_s is None else total_s - (time.monotonic() - started)
            if left is not None and left < longest * TRIAL_OVERRUN + REPORT_RESERVE_S:
                say(f"{format_duration(left)} of the total budget left: not enough for another trial")
                break
            trial = study.ask()
            params = {p.name: p.suggest(trial) for p in space}
            say(f"trial {trial.number}: {_params_text(params)}")
            result, cfg, summary = _run_trial(trial, params, base, out, planned_width, _metric(base))
            if summary is not None and _planner_chose(cfg):  # a summary comes with its config
                planned_width = summary["model"]["d_model"]
            configs[trial.number] = cfg
            results.append(result)
            if result.state == "complete":
                study.tell(trial, result.score)
            else:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED if result.state == "pruned"
                           else optuna.trial.TrialState.FAIL)
            say(f"trial {trial.number}: {_outcome(result)}")
            _write_reports(out, results, space, base, total_s)
            if result.stop_reason == "interrupted":
                say("interrupted: no more trials")
                break

    complete = [r for r in results if r.state == "complete"]
    if not complete:
        raise UserError(f"no trial completed; see {out / 'trials.md'} and each trial's pretrain.log")
    best = min(complete, key=lambda r: r.score)
    unit = _label(_metric(base))
    header = (f"# budgetlm tune: the best of {len(results)} trials: trial {best.number}, validation "
              f"{best.score:.4f} {unit}\n# re-run: budgetlm pretrain --config {out / 'best.toml'}\n")
    atomic_write_bytes(out / "best.toml", (header + to_toml(configs[best.number])).encode())
    print((out / "trials.md").read_text(), flush=True)
    say(f"best: trial {best.number} ({best.score:.4f} {unit}); its config is {out / 'best.toml'}")
    return {"best_trial": best.number, f"best_{_metric(base)}": best.score, "trials": [r.to_json() for r in results]}


def trial_config(base: RunConfig, params: dict, planned_width: int | None) -> tuple[RunConfig, dict]:
    """The trial's config and the settings applied over `base` (lr_factor becomes an lr)."""
    settings = {k: v for k, v in params.items() if k != LR_FACTOR}
    factor = params.get(LR_FACTOR, 1.0)
    if factor != 1.0:
        probe = with_overrides(base, settings)
        reference = probe.train.lr or learning_rate(_width(probe, planned_width), 0, probe.train.optim)
        settings["lr"] = reference * factor
    return with_overrides(base, settings, "[tune] "), settings


def _planner_chose(cfg: RunConfig) -> bool:
    """Whether pretrain lets the planner pick the model (as pretrain.run decides)."""
    m = cfg.model
    return bool(cfg.train.budget) and not (m.size or m.n_layer or m.d_model or m.n_head)


def _width(cfg: RunConfig, planned_width: int | None) -> int:
    # before any trial let the planner choose, its width is unknown: pretrain's fallback stands in
    if _planner_chose(cfg) and planned_width:
        return planned_width
    return model_for(cfg.model, vocab_size=64, planned=None).d_model


def _run_trial(trial: optuna.Trial, params: dict, base: RunConfig, out: Path, planned_width: int | None,
               metric: str = "val_bpb"):
    folder = out / f"trial-{trial.number:03d}"
    evals = 0

    def on_eval(entry: dict) -> bool:
        nonlocal evals
        evals += 1
        trial.report(entry[metric], step=evals)
        return trial.should_prune()

    started = time.monotonic()
    result = TrialResult(trial.number, params, {}, "failed", None, None, 0.0, None, str(folder))
    cfg = summary = None
    try:
        cfg, result.settings = trial_config(base, params, planned_width)
        prepare_out(folder)
        with (folder / "pretrain.log").open("w") as log, contextlib.redirect_stderr(log), \
                tracking.scope(out, f"tune {out.resolve().name}", folder.name):
            summary = pretrain.run(cfg, folder, quiet=True, on_eval=on_eval)
    except UserError as e:
        result.error = str(e)
    except Exception as e:  # unforeseen: recorded with the trial so the search goes on
        result.error = f"{type(e).__name__}: {e}"
    result.wall_s = round(time.monotonic() - started, 2)
    if summary is not None:
        result.best_val_bpb, result.best_val_loss = summary.get("best_val_bpb"), summary["best_val_loss"]
        result.stop_reason = summary["stop_reason"]
        if result.stop_reason == "pruned":
            result.state = "pruned"
        elif result.stop_reason == "interrupted":
            result.error = "interrupted"
        elif math.isfinite(result.score):
            result.state = "complete"
        else:
            result.error = "validation loss is not finite"
    return result, cfg, summary


@contextlib.contextmanager
def _optuna_quiet():
    """Optuna logs every trial at INFO; our own lines say the same, so keep it to warnings meanwhile."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in params.items()) or "(nothing searched)"


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _outcome(r: TrialResult) -> str:
    if r.state == "failed":
        return f"failed after {format_duration(r.wall_s)}: {r.error}"
    figure = f"val bpb {r.best_val_bpb:.4f}" if r.best_val_bpb is not None else f"val_loss {r.best_val_loss:.4f}"
    return f"{r.state}, best {figure} in {format_duration(r.wall_s)} ({r.stop_reason})"


# ---------------------------------------------------------------- reports

def _write_reports(out: Path, results: list[TrialResult], space: list[Param], base: RunConfig,
                   total_s: float | None) -> None:
    atomic_write_bytes(out / "trials.json", json.dumps([r.to_json() for r in results], indent=2).encode())
    atomic_write_bytes(out / "trials.md", markdown(results, space, base, total_s).encode())
    plot(results, out / "tune.png", _metric(base))


def markdown(results: list[TrialResult], space: list[Param], base: RunConfig, total_s: float | None) -> str:
    t = base.train
    limit = " / ".join(f"{k.replace('_', ' ')} {getattr(t, k)}" for k in ("budget", "max_steps", "max_tokens")
                       if getattr(t, k))
    complete = [r for r in results if r.state == "complete"]
    best = min(complete, key=lambda r: r.score).number if complete else None
    column = "best val bpb" if _metric(base) == "val_bpb" else "best val_loss"
    names = [p.name for p in space]
    lines = [
        "# budgetlm tune",
        "",
        (f"Each trial: {limit}; total budget: {format_duration(total_s) if total_s else 'none'}; "
         f"data: {', '.join(base.data.data) or 'default corpus'}; seed {t.seed}; {time.strftime('%Y-%m-%d %H:%M')}."),
        f"Search space: {'; '.join(p.describe() for p in space)}.",
        "",
        f"| trial | state | {column} | wall | " + " | ".join(names) + " |",
        "|---:|---|---:|---:|" + "---|" * len(names),
    ]
    for r in results:
        mark = " ★" if r.number == best else ""
        bpb = "" if r.score is None else f"{r.score:.4f}{mark}"
        state = r.state if not r.error else f"{r.state}: {r.error}".replace("|", "\\|")
        values = " | ".join(_value(r.params[n]) if n in r.params else "" for n in names)
        lines.append(f"| {r.number} | {state} | {bpb} | {r.wall_s:.1f}s | {values} |")
    return "\n".join(lines) + "\n"


def plot(results: list[TrialResult], path: Path, metric: str = "val_bpb") -> None:
    """Each trial's best validation bpb (or loss: `metric`; pruned ones marked) and the best so far."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for state, style in (("complete", {"marker": "o", "color": "tab:blue"}),
                         ("pruned", {"marker": "x", "color": "tab:gray"})):
        shown = [r for r in results if r.state == state]
        if shown:
            ax.scatter([r.number for r in shown], [r.score for r in shown], label=state, zorder=3, **style)
    best, xs, ys = math.inf, [], []
    for r in results:
        if r.state == "complete":
            best = min(best, r.score)
        if math.isfinite(best):
            xs.append(r.number)
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:orange", label="best so far")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("best validation bits per byte" if metric == "val_bpb" else "best validation loss (nats)")
    ax.set_title("budgetlm tune")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
