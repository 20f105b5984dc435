import json
import os
import sys
import types

import pytest

from budgetlm import tracking
from budgetlm.cli import main
from budgetlm.errors import UserError

TINY = ["--n-layer", "1", "--d-model", "32", "--n-head", "1", "--context", "32", "--micro-batch", "4",
        "--vocab-size", "300", "--compile", "off", "--quiet", "--no-calibrate"]


def evals_of(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]


def test_tensorboard_and_mlflow_hold_the_runs_figures_and_config(play_file, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(play_file), "--max-steps", "20", "--eval-every", "10",
                 "--report-to", "tensorboard,mlflow", "--out", str(out), *TINY]) == 0
    evals = evals_of(out)
    assert [e["step"] for e in evals] == [0, 10, 20]
    expected = [(e["step"], e["val_bpb"]) for e in evals]

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [(s.step, round(s.value, 6)) for s in events.Scalars("val_bpb")] == expected
    assert [s.step for s in events.Scalars("train_loss")][:1] == [1]  # the first step is always logged
    assert events.Scalars("summary/best_val_bpb")[0].value == pytest.approx(
        json.loads((out / "summary.json").read_text())["best_val_bpb"], rel=1e-6)
    assert "loss" in events.Tags()["images"]

    client = MlflowClient((out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("budgetlm").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_bpb")] == expected
    params = run.data.params
    assert params["train.max_steps"] == "20" and params["train.optim"] == "muon"
    assert params["model.n_layer"] == "1" and params["train.report_to"] == "tensorboard,mlflow"
    assert params["gpt.d_model"] == "32"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss.png", "summary.json"} <= artifacts


def test_wandb_offline_writes_its_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in, so offline
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    tracker = tracking.start("wandb", None, tmp_path / "run", {"train": {"lr": 0.01, "optim": "adamw"}})
    tracker.log({"kind": "train", "step": 1, "tokens": 256, "train_loss": 5.0})
    tracker.log({"kind": "eval", "step": 1, "tokens": 256, "val_bpb": 3.0})
    tracker.finish({"best_val_bpb": 3.0, "steps": 1}, [])
    (folder,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert list(folder.glob("run-*.wandb")) and (folder / "files").is_dir()


def test_a_missing_tracker_package_fails_before_training(play_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(play_file), "--max-steps", "5", "--report-to", "mlflow",
                 "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install mlflow" in err
    assert not out.exists()  # nothing prepared, nothing trained
    with pytest.raises(UserError, match="unknown tracker 'tensorbord'"):
        tracking.parse("tensorbord")


def test_a_scope_puts_runs_under_one_experiment(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    for name in ("adamw", "muon"):
        with tracking.scope(tmp_path, "compare x", name):
            tracker = tracking.start("mlflow,tensorboard", None, tmp_path / name, {"train": {"optim": name}})
            tracker.log({"kind": "eval", "step": 0, "val_bpb": 4.0})
            tracker.finish({"best_val_bpb": 4.0, "steps": 0}, [])
    client = MlflowClient((tmp_path / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("compare x").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["adamw", "muon"]
    assert sorted(os.listdir(tmp_path / "tensorboard")) == ["adamw", "muon"]


def test_records_become_metrics_against_their_step():
    assert tracking.metrics_of({"kind": "train", "step": 3, "tokens": 96, "train_loss": 2.5, "lr": 0.1,
                                "grad_norm": None}) == (3, {"tokens": 96.0, "train_loss": 2.5, "lr": 0.1})
    assert tracking.metrics_of({"kind": "eval", "step": 3, "tokens": 96, "val_bpb": 1.5}) == (3, {"val_bpb": 1.5})
    assert tracking.metrics_of({"kind": "fault", "step": 4, "loss": float("nan"), "skipped_steps": 1}) == \
        (4, {"fault/skipped_steps": 1.0})


def test_a_run_that_raises_midway_ends_its_tracker_runs_as_failed(play_file, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from budgetlm.config import RUN_SECTIONS, RunConfig, resolve
    from budgetlm.workflows import pretrain

    flags = {"data": [str(play_file)], "max_steps": 20, "eval_every": "5", "report_to": "tensorboard,mlflow",
             "n_layer": 1, "d_model": 32, "n_head": 1, "context": 32, "micro_batch": 4, "compile": "off",
             "calibrate": False, "vocab_size": 300}
    cfg = resolve(RunConfig, RUN_SECTIONS, None, flags)

    def fail_at_step_5(entry):
        if entry["step"] >= 5:
            raise UserError("stopped midway on purpose")
        return False

    out = tmp_path / "run"
    with pytest.raises(UserError, match="on purpose"):
        pretrain.run(cfg, out, quiet=True, on_eval=fail_at_step_5)
    client = MlflowClient((out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("budgetlm").experiment_id])
    assert run.info.status == "FAILED" and run.info.end_time is not None
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()  # the writer was closed, so what it logged before the error is on disk
    assert [s.step for s in events.Scalars("val_bpb")] == [0, 5]


class FakeSink:
    def __init__(self, log: list, name: str, fail_on: str = ""):
        self.log, self.name, self.fail_on = log, name, fail_on

    def start(self, params):
        pass

    def finish(self, summary, artifacts):
        if self.fail_on == "finish":
            raise OSError("disk full")
        self.log.append((self.name, "FINISHED by finish"))

    def close(self, status):
        self.log.append((self.name, status))


def test_every_exit_of_a_workflow_closes_what_it_left_open(monkeypatch, tmp_path):
    log = []
    monkeypatch.setattr(tracking, "require", lambda report_to: ["tensorboard", "mlflow"])
    monkeypatch.setattr(tracking, "TensorBoardSink", lambda where, own: FakeSink(log, "tb"))
    monkeypatch.setattr(tracking, "MlflowSink", lambda where, uri: FakeSink(log, "mlflow", fail_on="finish"))

    @tracking.closes_runs
    def workflow(error=None, finish=False):
        tracker = tracking.start("tensorboard,mlflow", None, tmp_path, {})
        if finish:
            tracker.finish({}, [])
        if error is not None:
            raise error
        return "done"

    assert workflow() == "done" and sorted(log) == [("mlflow", "FINISHED"), ("tb", "FINISHED")]
    log.clear()
    with pytest.raises(UserError):
        workflow(UserError("bad value midway"))
    assert sorted(log) == [("mlflow", "FAILED"), ("tb", "FAILED")]
    log.clear()
    with pytest.raises(KeyboardInterrupt):
        workflow(KeyboardInterrupt())
    assert sorted(log) == [("mlflow", "KILLED"), ("tb", "KILLED")]
    log.clear()
    with pytest.raises(OSError):  # one tracker's finish fails: it and those after it are closed as failed
        workflow(finish=True)
    assert log == [("tb", "FINISHED by finish"), ("mlflow", "FAILED")]
    log.clear()

    def unreachable(where, uri):
        raise ConnectionError("no MLflow server at the tracking URI")

    monkeypatch.setattr(tracking, "MlflowSink", unreachable)
    with pytest.raises(ConnectionError):  # the runs opened before the failing tracker end, outside a workflow too
        tracking.start("tensorboard,mlflow", None, tmp_path, {})
    assert log == [("tb", "FAILED")]


def test_wandb_marks_a_run_that_raised_as_failed(monkeypatch, tmp_path):
    finished = []

    class FakeRun:
        def define_metric(self, *args, **kwargs):
            pass

        def finish(self, exit_code=None):
            finished.append(exit_code)

    fake = types.SimpleNamespace(init=lambda **kwargs: FakeRun(), Settings=lambda **kwargs: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)

    @tracking.closes_runs
    def workflow():
        tracking.start("wandb", None, tmp_path, {})
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        workflow()
    assert finished == [1]
