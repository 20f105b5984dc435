"""Typed run configuration: dataclasses with defaults, loadable from TOML, overridden by flags.

Each field of a section becomes a command-line flag of the same name (`n_layer` → `--n-layer`), so
flags and code cannot drift apart. Field metadata holds the help text and the allowed values."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from budgetlm.errors import UserError
from budgetlm.train.optim import OPTIMIZERS
from budgetlm.train.schedule import SCHEDULES


def opt(default: Any = None, help: str = "", choices: tuple | None = None, factory=None, flag: str | None = None,
        low: float | None = None, high: float | None = None, above: float | None = None):
    """A config field with its help text, its allowed values (choices, or numbers in [low, high] or
    above `above`) and (rarely) a flag name of its own."""
    meta = {"help": help, "choices": choices, "flag": flag, "low": low, "high": high, "above": above}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


SIZES = {
    # name: (n_layer, d_model, n_head)
    "tiny": (2, 128, 2),
    "small": (4, 256, 4),
    "base": (6, 384, 6),
    "medium": (8, 512, 8),
    "large": (12, 768, 12),
}


@dataclass
class DataConfig:
    data: list[str] = opt(factory=list, help="text: .txt/.md files, folders, globs, .jsonl/.csv/.tsv/.parquet, "
                          "or a Hugging Face dataset; several allowed (default: Shakespeare's complete works)")
    val: list[str] = opt(factory=list, help="validation text (default: a held-out tail of --data)")
    val_fraction: float = opt(0.1, above=0, high=0.9, help="share of the data held out for validation when --val is not given")
    text_field: str = opt("text", help="field of .jsonl records holding the text")
    text_column: str | None = opt(None, help="column of .csv/.tsv/.parquet files holding the text")
    tokenizer: str | None = opt(None, help="a tokenizer.json to use instead of training one")
    vocab_size: int | None = opt(None, low=258, help="BPE vocabulary size (default: from the corpus size)")
    bpe_dropout: float | None = opt(None, low=0, high=0.9, help="train on the text re-segmented with BPE merges "
                                    "skipped at this rate (default: planned, 0.1 when the budget repeats the text "
                                    "more than 6 times, else 0)")
    bpe_passes: int | None = opt(None, low=1, help="re-segmented copies of the training text for --bpe-dropout "
                                 "(default: one per expected epoch after the first, at most 4)")


@dataclass
class ModelConfig:
    size: str | None = opt(None, help="preset size", choices=tuple(SIZES))
    n_layer: int | None = opt(None, low=1, help="Transformer blocks")
    d_model: int | None = opt(None, low=8, help="width of the residual stream")
    n_head: int | None = opt(None, low=1, help="attention heads")
    context: int | None = opt(None, low=2, help="context length in tokens")
    mlp: str = opt("relu2", help="feed-forward type", choices=("relu2", "swiglu"))
    mlp_ratio: float = opt(4.0, above=0, help="feed-forward width ÷ d_model")
    dropout: float | None = opt(None, low=0, high=0.95, help="dropout on embeddings and residual branches "
                                "(default: planned, 0.1 when the budget repeats the text more than 4 times, else 0)")
    attention_dropout: float = opt(0.0, low=0, high=0.95, help="dropout on attention probabilities (default 0: "
                                   "a random mask over every score, slow on a CPU; docs/planner.md)")
    logit_softcap: float = opt(0.0, low=0, help="cap logits at ±c with c·tanh(x/c); 0 turns it off")
    canon: int | None = opt(None, low=0, help="Canon layers: mix each position with the previous canon-1 before "
                            "attention and MLP, a causal per-channel convolution (default: planned, 4 when the budget "
                            "repeats the text more than 4 times, else 0 = off)")


@dataclass
class TrainConfig:
    budget: str | None = opt(None, help="wall-clock budget, e.g. 90s, 5m, 1h30m (evaluation and saving count)")
    max_steps: int | None = opt(None, low=1, help="stop after this many optimizer steps")
    max_tokens: int | None = opt(None, low=1, help="stop after this many training tokens")
    batch_tokens: str | None = opt(None, help="tokens per optimizer step (the effective batch), or auto")
    micro_batch: int | None = opt(None, low=1, help="sequences per forward pass; accumulation fills batch_tokens")
    # Muon: 2.104 vs AdamW's 2.163 bpb at 5 minutes on tinyshakespeare, 2.20 vs 2.38 at 60 s (docs/toolbox.md)
    optim: str = opt("muon", help="optimizer", choices=OPTIMIZERS)
    optim_args: str | None = opt(None, help="extra optimizer arguments, e.g. momentum=0.9,nesterov=false")
    lr: float | None = opt(None, above=0, help="peak learning rate (default: from the model width and optimizer)")
    min_lr_ratio: float = opt(0.0, low=0, high=1, help="learning-rate floor as a fraction of the peak")
    warmup: float = opt(0.02, low=0, help="linear warmup: a fraction of the budget (<1) or a number of steps (>=1)")
    schedule: str = opt("wsd", help="learning-rate schedule after warmup", choices=SCHEDULES)
    schedule_clock: str = opt("time", help="what schedules count: the budget's clock (time) or optimizer steps",
                              choices=("time", "steps"))
    decay_fraction: float = opt(0.4, low=0, high=1, help="wsd: share of the budget spent decaying to the floor")
    gamma: float = opt(0.1, above=0, high=1, help="step and plateau: factor per reduction; exponential: total decay over the run")
    step_size: float = opt(0.25, above=0, help="step: interval between reductions (<1: fraction of the budget; >=1: steps)")
    plateau_patience: int = opt(2, low=1, help="plateau: evaluations without improvement before the rate is reduced")
    weight_decay: float = opt(0.1, low=0, help="decoupled weight decay (L2) on weight matrices")
    l1: float = opt(0.0, low=0, help="L1 penalty on weight matrices, added to the loss")
    label_smoothing: float = opt(0.0, low=0, high=0.99, help="label smoothing of the training loss")
    ema: float | None = opt(None, low=0, high=0.99999, help="evaluate and keep a moving average of the weights with "
                            "this decay per step (default: planned, 0.998 when the budget repeats the text more than "
                            "4 times, else 0 = the raw weights)")
    beta1: float = opt(0.9, low=0, high=0.9999, help="Adam β1")
    beta2: float = opt(0.95, low=0, high=0.99999, help="Adam β2")
    calibrate: bool = opt(True, help="after training, fit a temperature for the logits on the validation text "
                          "(kept where it predicts held-out text better; the reported figure is cross-fitted)")
    grad_clip: float = opt(1.0, low=0, help="clip the gradient norm to this (0: no clipping)")
    precision: str = opt("auto", help="auto: bf16 where the device runs it fast, else fp32",
                         choices=("auto", "fp32", "bf16", "fp16"))
    compile: str = opt("auto", help="torch.compile the model (auto: on CUDA, and on CPU for budgets of 10m or more)",
                       choices=("auto", "on", "off"))
    device: str = opt("auto", help="auto, cpu, cuda, cuda:N or mps")
    eval_every: str | None = opt(None, help="evaluate every N steps or a duration like 30s (default: ~12 times a run)")
    eval_tokens: int | None = opt(None, low=1, help="validation tokens per periodic evaluation (default: fit ~0.5%% of the "
                                  "budget); the final evaluation always uses all")
    early_stop: str | None = opt(None, help="early stopping as metric,patience[,min_delta], e.g. val_bpb,3,0.001")
    patience: int = opt(0, low=0, help="stop after this many evaluations without improvement in val_loss (0: never)")
    min_delta: float = opt(0.0, low=0, help="smallest improvement of the monitored metric that counts")
    save_every: str | None = opt(None, help="save a resumable checkpoint every N steps or a duration like 30s")
    keep_checkpoints: int = opt(2, low=1, help="how many of the latest checkpoints to keep")
    resume: str | None = opt(None, help="auto: the newest valid checkpoint in --out (a fresh start when none); "
                             "or a checkpoint folder")
    seed: int = opt(0, low=0, help="seed for initialization and data order")
    threads: int | None = opt(None, low=1, help="CPU threads for PyTorch (default: the machine's cores)")
    report_to: str | None = opt(None, help="trackers to report to, comma-separated: tensorboard, mlflow, wandb "
                                "(pip install 'budgetlm[tracking]'; default: none)")
    tracking_uri: str | None = opt(None, help="MLflow tracking server (default: a file store in the run folder)")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RUN_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}  # RunConfig's TOML tables


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(tp) -> tuple[type, bool]:
    """(scalar type, is_list) of an annotation like `int | None` or `list[str]`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def add_section_flags(parser: argparse.ArgumentParser, cls, title: str) -> None:
    group = parser.add_argument_group(title)
    hints = _hints(cls)
    for f in fields(cls):
        tp, is_list = _base_type(hints[f.name])
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = tp
            kw["metavar"] = f.name.upper()
            if is_list:
                kw.update(action="extend", nargs="+")
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
            kw.pop("metavar", None)
        group.add_argument(_flag(f), **kw)


def _coerce(cls, name: str, value: Any, where: str) -> Any:
    f = next(x for x in fields(cls) if x.name == name)
    tp, is_list = _base_type(_hints(cls)[name])
    choices = f.metadata.get("choices")

    def one(v):
        if v is None:
            return None
        if tp is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if tp is str and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, tp) or (tp is int and isinstance(v, bool)):
            raise UserError(f"{where}{name}: expected {tp.__name__}, got {v!r}")
        if choices and v not in choices:
            raise UserError(f"{where}{name}: {v!r} is not allowed; choose one of {', '.join(map(str, choices))}")
        if tp in (int, float):
            low, high, above = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("above")
            if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high) or \
                    (above is not None and v <= above):
                allowed = " and ".join(x for x in (f"> {above:g}" if above is not None else "",
                                                   f">= {low:g}" if low is not None else "",
                                                   f"<= {high:g}" if high is not None else "") if x)
                raise UserError(f"{where}{name}: {v!r} is out of range; it must be {allowed or 'finite'}")
        return v

    if is_list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"{where}{name}: expected a list of {tp.__name__}, got {value!r}")
        return [one(v) for v in value]
    return one(value)


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None


def apply(config: Any, values: dict, where: str = "") -> None:
    """Set the dataclass `config`'s fields from `values`, checking names, types and choices."""
    names = {f.name for f in fields(config)}
    for key, value in values.items():
        if key not in names:
            raise UserError(f"{where}unknown key {key!r}; allowed: {', '.join(sorted(names))}")
        setattr(config, key, _coerce(type(config), key, value, where))


def resolve(run_cls, sections: dict[str, type], toml_path: str | None, flags: dict) -> Any:
    """Defaults ← TOML file ← flags. `sections` maps TOML table names to section dataclasses."""
    run = run_cls()
    if toml_path:
        doc = load_toml(toml_path)
        for table, values in doc.items():
            if table not in sections:
                raise UserError(f"{toml_path}: unknown table [{table}]; allowed: {', '.join('[' + s + ']' for s in sections)}")
            if not isinstance(values, dict):
                raise UserError(f"{toml_path}: {table} must be a table, like [{table}]")
            apply(getattr(run, table), values, where=f"{toml_path} [{table}] ")
    for table in sections:
        section = getattr(run, table)
        own = {f.name for f in fields(section)}
        apply(section, {k: v for k, v in flags.items() if k in own})
    return run


def apply_settings(run: Any, settings: dict, where: str = "") -> None:
    """Set flat `settings` (field name → value, `-` or `_`) on the section of the run config `run` that
    owns each field, as config.apply checks them: the Python API's keywords, one name per setting."""
    owners = {f.name: section.name for section in fields(run) for f in fields(getattr(run, section.name))}
    for key, value in settings.items():
        name = key.replace("-", "_")
        if name not in owners:
            close = difflib.get_close_matches(name, owners, n=1)
            raise UserError(f"{where}unknown setting {key!r}{f' (did you mean {close[0]}?)' if close else ''}; "
                            f"allowed: {', '.join(sorted(owners))}")
        apply(getattr(run, owners[name]), {name: value}, where)


def to_toml(config: Any) -> str:
    """TOML of a run config. Hand-written: our configs are flat tables of scalars and string lists,
    which tomllib (read-only) cannot write and which need no extra dependency."""
    lines = []
    for table, values in dataclasses.asdict(config).items():
        if not isinstance(values, dict):
            continue
        lines.append(f"[{table}]")
        for key, value in values.items():
            if value is None:
                lines.append(f"# {key} = (auto)")
            else:
                lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
        lines.append("")
    return "\n".join(lines)


FINETUNE_POOLINGS = ("mean", "last", "first")  # as budgetlm.models.classifier.POOLINGS


@dataclass
class FinetuneConfig:
    """`budgetlm finetune`: one flat section. Defaults left as None depend on the model (see the help)."""
    model: str = opt("scratch", help="the body: a budgetlm pretrain folder, hf:PATH (a Hugging Face encoder folder "
                     "with config.json, weights and tokenizer) or scratch (see --arch)")
    arch: str = opt("gpt", help="scratch: a small GPT with a BPE tokenizer, or the guides' LSTM baseline",
                    choices=("gpt", "lstm"))
    data: str | None = opt(None, help="labelled training data: .tsv, .csv, .jsonl or .parquet")
    val: str | None = opt(None, help="labelled validation data (default: a stratified --val-fraction of --data)")
    val_fraction: float = opt(0.1, above=0, high=0.9,
                              help="share of each class held out for validation when --val is not given")
    text_column: str | None = opt(None, help="column (or JSON field) holding the text (default: text, else the "
                                  "only text-like column)")
    label_column: str | None = opt(None, help="column (or JSON field) holding the label; any strings or numbers "
                                   "(default: label, else the only other column)")
    header: bool = opt(True, help="the CSV/TSV files' first row names the columns; --no-header: it is an example, "
                       "and the columns are named by position (--text-column 0 --label-column 1)")
    augment: str | None = opt(None, help="EDA on the training split only, e.g. sr=0.1,ri=0.1,rs=0.1,rd=0.1,n=4")
    synonyms: str | None = opt(None, help="thesaurus for --augment: a WordNet database folder or a JSON file "
                               "(default: NLTK's WordNet, else /usr/share/wordnet)")
    tokenizer: str | None = opt(None, help="scratch lstm: a word vocabulary (default) or BPE trained on the data",
                                choices=("word", "bpe"))
    vocab_size: int | None = opt(None, low=1, help="scratch: words kept (word tokenizer, default 20000) or the BPE "
                                 "vocabulary size (default: from the data size)")
    size: str | None = opt(None, help="scratch gpt: preset size (default small)", choices=tuple(SIZES))
    pooling: str | None = opt(None, help="how the head reads the body's states (default mean; lstm: last)",
                              choices=FINETUNE_POOLINGS)
    dropout: float | None = opt(None, low=0, high=0.95, help="dropout before the linear head (default 0.1; lstm 0.5)")
    max_length: int = opt(128, low=3, help="inputs are truncated to this many tokens")
    budget: str | None = opt(None, help="wall-clock budget, e.g. 90s, 10m (data preparation and evaluation count)")
    max_steps: int | None = opt(None, low=1, help="stop after this many optimizer steps")
    epochs: float | None = opt(None, above=0, help="stop after this many passes over the training split "
                               "(default: 3 for a pretrained body, no limit from scratch)")
    batch_size: int = opt(32, low=1, help="examples per optimizer step")
    micro_batch: int | None = opt(None, low=1,
                                  help="examples per forward pass; gradient accumulation fills --batch-size")
    optim: str | None = opt(None, help="optimizer (default adamw; lstm: adam)", choices=OPTIMIZERS)
    optim_args: str | None = opt(None, help="extra optimizer arguments, e.g. eps=1e-6")
    lr: float | None = opt(None, above=0,
                           help="peak learning rate (default: 5e-5·384/width for a Hugging Face encoder, a quarter "
                           "of pretrain's default for a budgetlm GPT, pretrain's default for a scratch GPT, 1e-3 for "
                           "the LSTM)")
    layer_lr_decay: float | None = opt(None, above=0, high=1, help="learning-rate factor per layer below the head "
                                       "(default 0.9 for a pretrained body, 1 = off from scratch)")
    freeze_steps: int = opt(0, low=0, help="train only the head for this many optimizer steps, then everything")
    freeze_embeddings: bool = opt(False, help="keep the body's token-embedding table as loaded (GPT: also its tied "
                                  "output head): fewer weights to fit to a small labelled set, and no update for "
                                  "the largest matrix")
    ema: float | None = opt(None, low=0, high=0.99999, help="evaluate and keep a moving average of the weights "
                            "with this decay per step (0: the raw weights; default 0.999 for a GPT body, else 0)")
    lm_weight: float | None = opt(None, low=0, help="GPT body: add this weight times its next-token loss on the "
                                  "training texts to the training loss, as GPT-1 (default 0: off)")
    warmup: float = opt(0.06, low=0, help="linear warmup: a fraction of the budget (<1) or a number of steps (>=1)")
    schedule: str = opt("linear", help="learning-rate schedule after warmup", choices=SCHEDULES)
    min_lr_ratio: float = opt(0.0, low=0, high=1, help="learning-rate floor as a fraction of the peak")
    decay_fraction: float = opt(0.4, low=0, high=1, help="wsd: share of the budget spent decaying to the floor")
    gamma: float = opt(0.1, above=0, high=1,
                       help="step and plateau: factor per reduction; exponential: total decay over the run")
    step_size: float = opt(0.25, above=0,
                           help="step: interval between reductions (<1: fraction of the budget; >=1: steps)")
    plateau_patience: int = opt(2, low=1, help="plateau: evaluations without improvement before the rate is reduced")
    weight_decay: float | None = opt(None, low=0, help="weight decay on weight matrices, embeddings excepted (default "
                                     "0.01; lstm 0, as the guide's Adam)")
    label_smoothing: float = opt(0.0, low=0, high=0.99, help="label smoothing of the training loss")
    beta1: float = opt(0.9, low=0, high=0.9999, help="Adam β1")
    beta2: float = opt(0.999, low=0, high=0.99999, help="Adam β2")
    grad_clip: float = opt(1.0, low=0, help="clip the gradient norm to this (0: no clipping)")
    precision: str = opt("auto", help="auto: bf16 where the device runs it fast, else fp32",
                         choices=("auto", "fp32", "bf16", "fp16"))
    device: str = opt("auto", help="auto, cpu, cuda, cuda:N or mps")
    eval_every: str | None = opt(None, help="evaluate every N steps or a duration like 60s (default: ~12 times a run)")
    early_stop: str | None = opt(None, help="metric,patience[,min_delta], e.g. val_loss,3: keep the best weights by "
                                 "that metric and stop after patience evaluations without improvement (default: "
                                 "keep the best val_accuracy, never stop early)")
    save_every: str | None = opt(None, help="save a resumable checkpoint every N steps or a duration like 60s")
    keep_checkpoints: int = opt(2, low=1, help="how many of the latest checkpoints to keep")
    resume: str | None = opt(None, help="auto: the newest valid checkpoint in --out (a fresh start when none); "
                             "or a checkpoint folder")
    seed: int = opt(0, help="seed for initialization, data order and augmentation")
    split_seed: int | None = opt(None, help="seed of the stratified --val-fraction split (default: --seed)")
    members: str = opt("auto", help="fine-tune this many times with seeds --seed, --seed+1, ... and keep, as one "
                       "model, the ensemble of those that raise its validation score (auto: a budgetlm GPT body "
                       "trains another member while the time left is at least 3/4 of the first member's, up to 4; "
                       "else 1)")
    threads: int | None = opt(None, low=1, help="CPU threads for PyTorch (default: the machine's cores)")
    report_to: str | None = opt(None, help="trackers to report to, comma-separated: tensorboard, mlflow, wandb "
                                "(pip install 'budgetlm[tracking]'; default: none)")
    tracking_uri: str | None = opt(None, help="MLflow tracking server (default: a file store in the run folder)")


@dataclass
class FinetuneRunConfig:
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
