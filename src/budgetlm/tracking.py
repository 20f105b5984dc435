"""Report runs to the trackers people already watch: TensorBoard, MLflow and Weights & Biases.

`report_to = "tensorboard,mlflow,wandb"` (the flag --report-to) picks them. Each is a sink with three
calls: `start` (the resolved config and plan as parameters), `log` (every metrics.jsonl record, as
metrics against its step, with the tokens or examples seen as a metric of their own) and `finish`
(the summary and the plots as artifacts). Local stores go in the run folder: OUT/tensorboard,
OUT/mlruns (MLflow's file store; --tracking-uri names a server instead) and OUT/wandb (offline
unless the user has logged in). `compare` and `tune` open a `scope` around each variant or trial,
so every one becomes its own run under one experiment, stored in the comparison's folder. A workflow's `run`
decorated with `closes_runs` ends the runs it started however it exits: a run it did not finish (an exception,
a UserError midway, Ctrl-C) is closed as failed (killed) where the tracker keeps a status."""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import netrc
import os
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from budgetlm.errors import UserError

# tracker name → (module imported to use it, package to install)
TRACKERS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
            "wandb": ("wandb", "wandb")}
# counters every record carries; logged from training records, where they belong, as metrics of their own
COUNTERS = ("tokens", "examples", "elapsed_s")


def parse(report_to: str | None) -> list[str]:
    """"tensorboard,mlflow" → ["tensorboard", "mlflow"]; none or "" → []."""
    names = [n.strip().lower() for n in (report_to or "").split(",") if n.strip() and n.strip().lower() != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UserError(f"--report-to {report_to!r}: unknown tracker {unknown[0]!r}; choose from "
                        f"{', '.join(TRACKERS)} (comma-separated)")
    return list(dict.fromkeys(names))


def require(report_to: str | None) -> list[str]:
    """The trackers asked for, each importable; else one line naming the package to install. Workflows
    call it first, so a missing package stops the run before any training."""
    names = parse(report_to)
    for name in names:
        module, package = TRACKERS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"--report-to {name} needs the {package} package: pip install {package} "
                            "(or pip install 'budgetlm[tracking]' for all trackers)") from None
    return names


@dataclass(frozen=True)
class Scope:
    """Where runs go: `root` holds the local stores, `experiment` groups the runs, `run` names this one."""
    root: Path
    experiment: str
    run: str


_scope: ContextVar[Scope | None] = ContextVar("budgetlm_tracking_scope", default=None)


@contextlib.contextmanager
def scope(root: Path, experiment: str, run: str):
    """Runs started inside go to `root`'s stores as run `run` of `experiment` (compare's variants, tune's trials)."""
    token = _scope.set(Scope(Path(root), experiment, run))
    try:
        yield
    finally:
        _scope.reset(token)


def flatten(params: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.1}} → {"train.lr": 0.1}; lists become text and unset (None) values are left out."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(map(str, value))
        elif value is not None:
            flat[name] = value
    return flat


def metrics_of(record: dict) -> tuple[int, dict[str, float]]:
    """(step, metrics) of a metrics.jsonl record: its finite numbers, named as in the file; records of
    other kinds than train and eval (fault, rollback) prefixed by their kind."""
    kind = record.get("kind", "train")
    values = {}
    for key, value in record.items():
        if key in ("step", "kind") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or (kind != "train" and key in COUNTERS):
            continue
        values[key if kind in ("train", "eval") else f"{kind}/{key}"] = float(value)
    return int(record.get("step", 0)), values


def figures_of(summary: dict) -> dict[str, float]:
    """The summary's own finite numbers (best_val_bpb, steps, ...), not those of the config it repeats."""
    return {k: float(v) for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardSink:
    def __init__(self, where: Scope, own_folder: bool):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = where.root / "tensorboard" if own_folder else where.root / "tensorboard" / where.run
        self.writer = SummaryWriter(log_dir=str(self.logdir))
        self.params: dict = {}

    def start(self, params: dict) -> None:
        self.params = flatten(params)
        self.writer.add_text("config", "```\n" + json.dumps(params, indent=2, default=str) + "\n```", 0)

    def log(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, summary: dict, artifacts: list[Path]) -> None:
        from torch.utils.tensorboard.summary import hparams

        figures = {f"summary/{k}": v for k, v in figures_of(summary).items()}
        step = int(summary.get("steps") or 0)
        for key, value in figures.items():
            self.writer.add_scalar(key, value, step)
        # the HParams dashboard's row: written into this run's own file, not a sub-run as add_hparams would
        shown = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.params.items()}
        for event in hparams(shown, figures):
            self.writer.file_writer.add_summary(event)
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2, default=str) + "\n```", step)
        for path in artifacts:
            import matplotlib.image

            self.writer.add_image(path.stem, matplotlib.image.imread(path)[..., :3], step, dataformats="HWC")
        self.writer.close()

    def close(self, status: str) -> None:
        self.writer.close()  # flushes what was logged; TensorBoard keeps no run status


class MlflowSink:
    def __init__(self, where: Scope, uri: str | None):
        from mlflow.tracking import MlflowClient

        if uri is None:  # the file store, in maintenance mode but what a run folder can hold without a server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (where.root / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(where.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(where.experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=where.run).info.run_id

    def start(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, summary: dict, artifacts: list[Path]) -> None:
        step = int(summary.get("steps") or 0)
        self.log(step, {f"summary.{k}": v for k, v in figures_of(summary).items()})
        self.client.log_dict(self.run_id, summary, "summary.json")
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbSink:
    def __init__(self, where: Scope):
        import wandb

        self.wandb = wandb
        self.where = where

    def start(self, params: dict) -> None:
        mode = None if os.environ.get("WANDB_MODE") or _wandb_logged_in() else "offline"
        self.run = self.wandb.init(project="budgetlm", group=self.where.experiment, name=self.where.run,
                                   dir=str(self.where.root), config=params, mode=mode, reinit="create_new",
                                   settings=self.wandb.Settings(silent=True, console="off"))
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({"step": step, **metrics})

    def finish(self, summary: dict, artifacts: list[Path]) -> None:
        self.run.summary.update(figures_of(summary))
        if artifacts:
            self.run.log({"step": int(summary.get("steps") or 0),
                          **{path.stem: self.wandb.Image(str(path)) for path in artifacts}})
        self.run.finish()

    def close(self, status: str) -> None:
        if hasattr(self, "run"):  # started
            self.run.finish(exit_code=0 if status == "FINISHED" else 1)  # W&B shows a non-zero exit as failed


class Tracker:
    """The sinks of one run: `log` takes each metrics.jsonl record, `finish` the summary and the plots;
    `close` ends the runs still open without them."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, record: dict) -> None:
        step, metrics = metrics_of(record)
        if metrics:
            for sink in self.sinks:
                sink.log(step, metrics)

    def finish(self, summary: dict, artifacts: list[Path]) -> None:
        present = [Path(p) for p in artifacts if Path(p).is_file()]
        try:
            while self.sinks:
                self.sinks[0].finish(summary, present)
                self.sinks.pop(0)
        except BaseException:
            self.close("FAILED")
            raise

    def close(self, status: str) -> None:
        """End the runs still open as `status` (FINISHED, FAILED or KILLED) where the tracker keeps one."""
        while self.sinks:
            sink = self.sinks.pop()
            with contextlib.suppress(Exception):  # the error that ended the run is the one to report
                sink.close(status)


# the trackers started inside the innermost `closes_runs` workflow
_started: ContextVar[list[Tracker] | None] = ContextVar("budgetlm_started_trackers", default=None)


def closes_runs(workflow):
    """Decorate a workflow's `run`: the tracker runs it started and did not finish are closed when it returns
    or raises, as FAILED (KILLED on Ctrl-C) when it raised; the exception goes on."""
    @functools.wraps(workflow)
    def run(*args, **kwargs):
        started: list[Tracker] = []
        token = _started.set(started)
        status = "FAILED"
        try:
            result = workflow(*args, **kwargs)
            status = "FINISHED"
            return result
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            _started.reset(token)
            for tracker in started:
                tracker.close(status)
    return run


def start(report_to: str | None, tracking_uri: str | None, out: Path, params: dict) -> Tracker | None:
    """A tracker for the run in `out` with its parameters logged, or None when nothing was asked for."""
    names = require(report_to)
    if not names:
        return None
    where = _scope.get()
    own_folder = where is None
    if where is None:
        where = Scope(Path(out), "budgetlm", Path(out).resolve().name)
    tracker = Tracker([])
    try:
        for name in names:
            if name == "tensorboard":
                tracker.sinks.append(TensorBoardSink(where, own_folder))
            elif name == "mlflow":
                tracker.sinks.append(MlflowSink(where, tracking_uri))
            else:
                tracker.sinks.append(WandbSink(where))
        for sink in tracker.sinks:
            sink.start(params)
    except BaseException:  # e.g. an MLflow server that cannot be reached: the runs opened before it end
        tracker.close("FAILED")
        raise
    if _started.get() is not None:
        _started.get().append(tracker)
    return tracker


def finish(tracker: Tracker | None, summary: dict, artifacts: list[Path]) -> None:
    """Log the summary and the plots that exist, and close the run (nothing when untracked)."""
    if tracker is not None:
        tracker.finish(summary, artifacts)
