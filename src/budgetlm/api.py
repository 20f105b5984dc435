"""The Python API: the commands as functions, calling the same workflows as the command line.

Settings are keywords named as the config fields (and the flags without their dashes): any field of
the [data], [model] and [train] sections for `pretrain`, `compare` and `tune`, of [finetune] for
`finetune`. A wrong name or value raises budgetlm.UserError with the line the command line prints."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from budgetlm.config import (
    RUN_SECTIONS,
    FinetuneConfig,
    FinetuneRunConfig,
    RunConfig,
    apply_settings,
    resolve,
)
from budgetlm.errors import UserError
from budgetlm.report import default_out


@contextlib.contextmanager
def _silenced(quiet: bool):
    """With `quiet`, nothing reaches the console: progress, the workflows' lines and printed reports."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        yield


def _folder(out: str | Path | None) -> Path:
    return Path(out) if out is not None else default_out()


def _sources(data) -> list[str]:
    if data is None:
        return []
    return [str(d) for d in data] if isinstance(data, (list, tuple)) else [str(data)]


def _run_config(config: str | Path | None, data, budget: str | None, settings: dict) -> RunConfig:
    """Defaults ← the TOML file `config` ← data, budget and the keywords."""
    cfg = resolve(RunConfig, RUN_SECTIONS, str(config) if config else None, {})
    given = dict(settings)
    if data is not None:
        given["data"] = _sources(data)
    if budget is not None:
        given["budget"] = budget
    apply_settings(cfg, given)
    return cfg


@dataclass
class Run:
    """A finished run: `summary` (summary.json as a dict), `plan` (what the planner chose, or None),
    `path` (the run folder) and `model` (the trained model, loaded on first use)."""

    summary: dict
    path: Path
    plan: dict | None = None
    _model: Model | None = field(default=None, repr=False)

    @property
    def model(self) -> Model:
        """The trained model in `path`, as `budgetlm.load(path)` gives it."""
        if self._model is None:
            self._model = load(self.path)
        return self._model


def pretrain(data=None, budget: str | None = "5m", out: str | Path | None = None, *, quiet: bool = False,
             config: str | Path | None = None, **settings) -> Run:
    """Train a GPT on text within `budget` and keep its best weights in `out`.

    data: text files, folders, globs, tables or a Hugging Face dataset name, one or a list (default:
      Shakespeare's complete works). budget: wall-clock time like "90s", "5m" (None: only the limits
      among the settings, e.g. max_steps=200). out: the run folder (default runs/<timestamp>).
    quiet: print nothing (else progress shows as on the command line; in Jupyter as a widget).
    config: a TOML file with [data], [model], [train] tables, which the keywords override.
    settings: any field of those sections, e.g. size="tiny", optim="adamw", report_to="tensorboard".
    Returns a Run; raises UserError on bad input."""
    from budgetlm.workflows import pretrain as workflow

    cfg = _run_config(config, data, budget, settings)
    folder = _folder(out)
    with _silenced(quiet):
        summary = workflow.run(cfg, folder, quiet=quiet)
    return Run(summary, folder, summary.get("plan"))


def finetune(data, val=None, model: str = "scratch", budget: str | None = "5m", out: str | Path | None = None, *,
             quiet: bool = False, config: str | Path | None = None, **settings) -> Run:
    """Train a text classifier on labelled data within `budget` and keep its best weights in `out`.

    data, val: labelled tables (.tsv, .csv, .jsonl, .parquet); the columns `text` and `label` unless
      text_column= / label_column= say otherwise, header=False for a CSV/TSV without a header row.
    model: "scratch" (a new GPT, or arch="lstm"), a budgetlm pretrain folder, or "hf:PATH".
    budget, out, quiet, config: as for `pretrain` (config holds a [finetune] table).
    settings: any [finetune] field, e.g. epochs=3, lr=1e-4, report_to="mlflow".
    Returns a Run whose model can `predict`; raises UserError on bad input."""
    from budgetlm.workflows import ensemble as workflow  # one fine-tuning, or members as --members asks

    cfg = resolve(FinetuneRunConfig, {"finetune": FinetuneConfig}, str(config) if config else None, {})
    given = {"data": str(data), "model": str(model), **settings}
    if val is not None:
        given["val"] = str(val)
    if budget is not None:
        given["budget"] = budget
    apply_settings(cfg, given)
    folder = _folder(out)
    with _silenced(quiet):
        summary = workflow.run(cfg.finetune, folder, quiet=quiet)
    return Run(summary, folder)


@dataclass
class Comparison:
    """Variants trained on the same data and budget: `records` (compare.json's, best validation bpb
    first) and `path` (the folder with compare.md, compare.png and a run folder per variant)."""

    records: list[dict]
    path: Path

    @property
    def best(self) -> Run:
        """The best variant's run."""
        record = next((r for r in self.records if not r["error"]), None)
        if record is None:
            raise UserError(f"every variant failed; see {self.path / 'compare.md'}")
        return _run_in(Path(record["run"]))


def compare(data=None, vary: dict | list[str] | None = None, sweep: str | Path | None = None,
            budget: str | None = "60s", out: str | Path | None = None, *, quiet: bool = False,
            config: str | Path | None = None, **settings) -> Comparison:
    """Train each variant of one config on the same data and budget, one after another.

    vary: {"optim": ["adamw", "muon"]} or ["optim=adamw,muon"] (several keys: their grid); or sweep:
    a TOML file of [[variant]] tables. The other arguments and settings are those of `pretrain`, and
    make the config every variant starts from. Returns a Comparison."""
    from budgetlm.workflows import compare as workflow

    base = _run_config(config, data, budget, settings)
    if isinstance(vary, dict):
        vary = [f"{key}={','.join(_literal(v) for v in values)}" for key, values in vary.items()]
    found = workflow.variants(base, vary=vary, sweep=str(sweep) if sweep else None)
    folder = _folder(out)
    with _silenced(quiet):
        records = workflow.run(base, found, folder)
    return Comparison(workflow.ranked(records), folder)


def _literal(value) -> str:
    """A value as --vary reads it back (a TOML literal; text as it is)."""
    return json.dumps(value) if isinstance(value, bool) else str(value)


@dataclass
class Search:
    """A hyperparameter search: `summary` ({best_trial, best_val_bpb, trials}) and `path` (the folder
    with best.toml, trials.md, tune.png and a run folder per trial)."""

    summary: dict
    path: Path

    @property
    def best(self) -> Run:
        """The best trial's run."""
        return _run_in(self.path / f"trial-{self.summary['best_trial']:03d}")


def tune(data=None, space: dict | None = None, total_budget: str | None = None, trial_budget: str | None = None,
         trials: int | None = None, out: str | Path | None = None, *, quiet: bool = False,
         config: str | Path | None = None, **settings) -> Search:
    """Search hyperparameters with Optuna: trials of `trial_budget` each, until `trials` ran or
    `total_budget` holds no more.

    space: the search space as a [tune] table, e.g. {"lr_factor": {"low": 0.5, "high": 2, "log": True},
    "optim": ["adamw", "muon"]} (default: the config file's [tune] table, else the command's default).
    The other arguments and settings are those of `pretrain`. Returns a Search."""
    from budgetlm.workflows import tune as workflow

    base, table = workflow.load_config(str(config) if config else None, {}, RUN_SECTIONS)
    given = dict(settings)
    if data is not None:
        given["data"] = _sources(data)
    apply_settings(base, given)
    chosen = space if space is not None else table if table is not None else workflow.DEFAULT_SPACE
    parsed = workflow.parse_space(chosen, base)
    folder = _folder(out)
    with _silenced(quiet):
        summary = workflow.run(base, parsed, folder, total_budget=total_budget, trial_budget=trial_budget,
                               trials=trials)
    return Search(summary, folder)


def _run_in(folder: Path) -> Run:
    path = folder / "summary.json"
    if not path.is_file():
        raise UserError(f"{folder}: no summary.json; the run did not finish")
    summary = json.loads(path.read_text())
    return Run(summary, folder, summary.get("plan"))


class Model:
    """A trained model in a run folder: a language model (`generate`, `eval`) from pretrain, or a
    classifier (`predict`) from finetune; either can be exported."""

    def __init__(self, path: str | Path):
        from budgetlm.train.checkpoint import read_config

        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"{self.path}: no such folder; give the folder of a budgetlm run")
        self.config = read_config(self.path)
        self.arch = self.config.get("arch")
        self._classifier = None

    def __repr__(self) -> str:
        return f"budgetlm.Model({str(self.path)!r}, arch={self.arch!r})"

    def generate(self, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = 200, top_p: float | None = None, seed: int = 0, device: str = "auto") -> str:
        """The prompt and its sampled continuation, as `budgetlm generate` prints them. temperature 0 is
        greedy; top_k / top_p limit sampling to the likeliest tokens."""
        from budgetlm.workflows import generate

        return generate.run(str(self.path), prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k or None, top_p=top_p, seed=seed, device=device, out=io.StringIO(),
                            stream=False)

    def eval(self, text_or_path, device: str = "auto") -> dict:
        """{loss, bpb, ppl, tokens, bytes} of the model on a text, or on files (a Path, an existing path,
        a glob, or a list of them), as `budgetlm eval` measures them."""
        from budgetlm.workflows import evaluate

        if isinstance(text_or_path, (list, tuple)):
            return evaluate.run(str(self.path), [str(p) for p in text_or_path], device=device)
        if isinstance(text_or_path, Path) or (isinstance(text_or_path, str) and "\n" not in text_or_path
                                              and (Path(text_or_path).exists() or any(c in text_or_path for c in "*?["))):
            return evaluate.run(str(self.path), [str(text_or_path)], device=device)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "text.txt"
            path.write_text(text_or_path, encoding="utf-8")
            return evaluate.run(str(self.path), [str(path)], device=device)

    def predict(self, texts: str | list[str], device: str = "auto"):
        """A classifier's {"label", "probs"} for each text (one dict for one string), as `budgetlm
        predict` gives them; the model stays loaded between calls."""
        from budgetlm.train.runtime import pick_device
        from budgetlm.workflows import predict

        if self.arch != "classifier":
            raise UserError(f"{self.path}: holds a {self.arch!r} model, not a classifier; predict needs the "
                            "folder of budgetlm finetune")
        if self._classifier is None:
            dev = pick_device(device)
            self._classifier = (*predict.load_classifier(self.path, dev), dev)
        model, config, tok, dev = self._classifier
        found = predict.predict(model, config, tok, [texts] if isinstance(texts, str) else list(texts), dev)
        return found[0] if isinstance(texts, str) else found

    def export(self, out: str | Path, format: str = "hf") -> Path:
        """Write the model as a Hugging Face transformers folder (as `budgetlm export`); returns the folder."""
        from budgetlm.workflows import export

        return export.run(str(self.path), Path(out), format=format)


def load(path: str | Path) -> Model:
    """The model in a run folder (pretrain's or finetune's --out)."""
    return Model(path)
