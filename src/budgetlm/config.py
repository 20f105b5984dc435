"""Typed run configuration: dataclasses with defaults, loadable from TOML, overridden by flags.

Each field of a section becomes a command-line flag of the same name (`n_layer` → `--n-layer`), so
flags and code cannot drift apart. Field metadata holds the help text and the allowed values. Settings
written as text ("5m", "30s", "val_bpb,3") are parsed into typed values when the config is built, so a
bad value is refused before any work starts and a workflow never parses a string."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from budgetlm.budget import EarlyStop, Every, format_duration, seconds_text
from budgetlm.errors import UserError
from budgetlm.models.config import SIZES, ModelConfig
from budgetlm.settings import Section, _base_type, _coerce, _hints, count_or_auto, duration, flag_name, opt

# Names only: train/optim.py and train/schedule.py build them (a test checks both lists agree).
OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop", "adafactor", "lamb", "muon")
SCHEDULES = ("wsd", "cosine", "linear", "constant", "step", "exponential", "inverse-sqrt", "plateau")
SEED_MAX = 2 ** 63 - 1  # torch takes seeds below 2**64; a margin for the seed+k of ensemble members


@dataclass
class DataConfig(Section):
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
                                    "more than 10 times, else 0)")
    bpe_passes: int | None = opt(None, low=1, help="re-segmented copies of the training text for --bpe-dropout "
                                 "(default: one per expected epoch after the first, at most 4)")


@dataclass
class TrainingSettings(Section):
    """What every training command takes: limits, optimizer, schedule, regularization, precision,
    evaluation, checkpoints. Pretraining and fine-tuning extend it and change some defaults."""
    budget: float | None = opt(None, parse=duration, help="wall-clock budget, e.g. 90s, 5m, 1h30m (data "
                               "preparation, evaluation and saving count)")
    max_steps: int | None = opt(None, low=1, help="stop after this many optimizer steps")
    optim: str | None = opt("muon", help="optimizer", choices=OPTIMIZERS)
    optim_args: str | None = opt(None, empty=True, help="extra optimizer arguments, e.g. momentum=0.9,nesterov=false")
    lr: float | None = opt(None, above=0, help="peak learning rate (default: from the model width and optimizer)")
    min_lr_ratio: float = opt(0.0, low=0, high=1, help="learning-rate floor as a fraction of the peak")
    warmup: float = opt(0.02, low=0, help="linear warmup: a fraction of the budget (<1) or a number of steps (>=1)")
    schedule: str = opt("wsd", help="learning-rate schedule after warmup", choices=SCHEDULES)
    decay_fraction: float = opt(0.4, low=0, high=1, help="wsd: share of the budget spent decaying to the floor")
    gamma: float = opt(0.1, above=0, high=1,
                       help="step and plateau: factor per reduction; exponential: total decay over the run")
    step_size: float = opt(0.25, above=0,
                           help="step: interval between reductions (<1: fraction of the budget; >=1: steps)")
    plateau_patience: int = opt(2, low=1, help="plateau: evaluations without improvement before the rate is reduced")
    weight_decay: float | None = opt(0.1, low=0, help="decoupled weight decay (L2) on weight matrices")
    label_smoothing: float = opt(0.0, low=0, high=0.99, help="label smoothing of the training loss")
    ema: float | None = opt(None, low=0, high=0.99999, help="evaluate and keep a moving average of the weights with "
                            "this decay per step (default: 0.998 where the plan expects a GPT to read its text more "
                            "than 10 times, else 0 = the raw weights; docs/planner.md)")
    beta1: float = opt(0.9, low=0, high=0.9999, help="Adam β1")
    beta2: float = opt(0.95, low=0, high=0.99999, help="Adam β2")
    grad_clip: float = opt(1.0, low=0, help="clip the gradient norm to this (0: no clipping)")
    precision: str = opt("auto", help="auto: bf16 where the device runs it fast, else fp32",
                         choices=("auto", "fp32", "bf16", "fp16"))
    device: str = opt("auto", help="auto, cpu, cuda, cuda:N or mps")
    eval_every: Every | None = opt(None, parse=Every.parse, help="evaluate every N steps or a duration like 30s "
                                   "(default: ~12 times a run)")
    early_stop: EarlyStop | None = opt(None, parse=EarlyStop.parse, help="early stopping as metric,patience"
                                       "[,min_delta], e.g. val_bpb,3,0.001")
    save_every: Every | None = opt(None, parse=Every.parse, help="save a resumable checkpoint every N steps or a "
                                   "duration like 30s")
    keep_checkpoints: int = opt(2, low=1, help="how many of the latest checkpoints to keep")
    resume: str | None = opt(None, help="auto: the newest valid checkpoint in --out (a fresh start when none); "
                             "or a checkpoint folder")
    seed: int = opt(0, low=0, high=SEED_MAX, help="seed for initialization and data order")
    threads: int | None = opt(None, low=1, help="CPU threads for PyTorch (default: the machine's cores)")
    report_to: str | None = opt(None, empty=True, help="trackers to report to, comma-separated: tensorboard, mlflow, wandb "
                                "(pip install 'budgetlm[tracking]'; default: none)")
    tracking_uri: str | None = opt(None, help="MLflow tracking server (default: a file store in the run folder)")


@dataclass
class TrainConfig(TrainingSettings):
    # Muon: 2.104 vs AdamW's 2.163 bpb at 5 minutes on tinyshakespeare, 2.20 vs 2.38 at 60 s (docs/toolbox.md)
    optim: str = opt("muon", help="optimizer", choices=OPTIMIZERS)
    weight_decay: float = opt(0.1, low=0, help="decoupled weight decay (L2) on weight matrices")
    max_tokens: int | None = opt(None, low=1, help="stop after this many training tokens")
    budget_flops: float | None = opt(None, above=0, help="compute budget in model FLOPs, e.g. 3e15 (6 × parameters "
                                     "+ attention, per training token): planned for, and the run stops when spent")
    batch_tokens: int | str | None = opt(None, parse=count_or_auto("--batch-tokens", "tokens"),
                                         help="tokens per optimizer step (the effective batch), or auto: the "
                                         "largest micro-batch that fits memory")
    micro_batch: int | None = opt(None, low=1, help="sequences per forward pass; accumulation fills batch_tokens")
    strategy: str = opt("auto", help="under torchrun: ddp (a replica per process), fsdp (parameters, gradients and "
                        "optimizer state sharded) or auto (ddp where the training state fits one device)",
                        choices=("auto", "ddp", "fsdp"))
    schedule_clock: str = opt("time", help="what schedules count: the budget's clock (time) or optimizer steps",
                              choices=("time", "steps"))
    l1: float = opt(0.0, low=0, help="L1 penalty on weight matrices, added to the loss")
    calibrate: bool = opt(True, help="after training, fit a temperature for the logits on the validation text "
                          "(kept where it predicts held-out text better; the reported figure is cross-fitted)")
    compile: str = opt("auto", help="torch.compile the Transformer block (auto: where the tokens a faster step "
                       "gains in the budget exceed those the compile costs, as measured on this machine)",
                       choices=("auto", "on", "off"))
    eval_tokens: int | None = opt(None, low=1, help="validation tokens per periodic evaluation (default: fit ~0.5%% of "
                                  "the budget); the final evaluation always uses all")
    mask_rate: float = opt(0.25, above=0, high=0.9, help="--arch bert: share of the tokens masked for the "
                           "masked-LM loss (80%% [MASK], 10%% random, 10%% kept; 0.25 as Cramming, docs/architectures.md)")
    patience: int = opt(0, low=0, help="stop after this many evaluations without improvement in val_loss (0: never)")
    min_delta: float = opt(0.0, low=0, help="smallest improvement of the monitored metric that counts")

    @property
    def stopping(self) -> EarlyStop:
        """--early-stop, else val_loss with --patience and --min-delta."""
        return self.early_stop or EarlyStop("val_loss", self.patience, self.min_delta)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return plain(self)


RUN_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}  # RunConfig's TOML tables


def add_section_flags(parser: argparse.ArgumentParser, cls, title: str) -> None:
    group = parser.add_argument_group(title)
    hints = _hints(cls)
    for f in fields(cls):
        if flag_name(f) is None:
            continue
        tp, is_list = _base_type(hints[f.name])
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = str if f.metadata.get("parse") else tp  # parsed (and refused) when the config is built
            kw["metavar"] = f.name.upper()
            if is_list:
                kw.update(action="extend", nargs="+")
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
            kw.pop("metavar", None)
        group.add_argument(flag_name(f), **kw)


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
    """Set the dataclass `config`'s fields from `values`, checking names, types and choices, and
    parsing values written as text."""
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
        own = {f.name for f in fields(section) if flag_name(f)}
        apply(section, {k: v for k, v in flags.items() if k in own})
    return run


def _written(value: Any) -> Any:
    """A typed setting as its TOML and flag text ("5m", "30s", "val_bpb,3,0")."""
    if isinstance(value, (Every, EarlyStop)):
        return str(value)
    return value


def plain(config: Any) -> dict:
    """A run config as nested dicts of plain values (typed settings as their text), for JSON and TOML."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, (Every, EarlyStop)):
            out[f.name] = plain(value)
        elif f.name == "budget" and value is not None:
            out[f.name] = format_duration(value) if value == round(value) else seconds_text(value)
        else:
            out[f.name] = _written(value)
    return out


def apply_settings(run: Any, settings: dict, where: str = "") -> None:
    """Set flat `settings` (field name → value, `-` or `_`) on the section of the run config `run` that
    owns each field, checked as `apply` checks them: the Python API's keywords, one name per setting."""
    for key, value in settings.items():
        name = normalize_key(run, key, where)
        apply(getattr(run, section_of(run, name)), {name: value}, where)


def to_toml(config: Any) -> str:
    """TOML of a run config; settings left to the plan or the model (None) are listed as comments."""
    parts = []
    for table, values in plain(config).items():
        text = tomli_w.dumps({table: {k: v for k, v in values.items() if v is not None}})
        unset = "".join(f"# {key} = (auto)\n" for key, v in values.items() if v is None)
        parts.append(text + unset)
    return "\n".join(parts)


# ---------------------------------------------------------------- flat overrides (compare, tune)

def _sections(cfg: Any) -> list[str]:
    return [f.name for f in fields(cfg)]


def config_keys(cfg: Any) -> list[str]:
    return sorted({f.name for s in _sections(cfg) for f in fields(getattr(cfg, s))})


def section_of(cfg: Any, key: str) -> str | None:
    return next((s for s in _sections(cfg) if key in {f.name for f in fields(getattr(cfg, s))}), None)


def normalize_key(cfg: Any, key: str, where: str) -> str:
    """`n-layer` or `n_layer` → `n_layer`; unknown keys are an error listing the allowed ones."""
    name = key.strip().replace("-", "_")
    if section_of(cfg, name) is None:
        close = difflib.get_close_matches(name, config_keys(cfg), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"{where}unknown key {key!r}{hint}; allowed: {', '.join(config_keys(cfg))}")
    return name


def with_overrides(base: Any, settings: dict, where: str = "") -> Any:
    """A copy of `base` with flat `settings` (key → value) applied and validated by `apply`."""
    cfg = copy.deepcopy(base)
    apply_settings(cfg, settings, where)
    return cfg


def setting(cfg: Any, key: str) -> Any:
    """The value of a flat key as JSON and TOML write it (typed settings as their text)."""
    return plain(getattr(cfg, section_of(cfg, key)))[key]


def value_types(cfg: Any, key: str) -> set[type]:
    """The scalar types a config key holds: `int | None` → {int}, `list[str]` → {str}; a setting written
    as text ("5m", "30s") → {str}."""
    section = type(getattr(cfg, section_of(cfg, key)))
    if next(f for f in fields(section) if f.name == key).metadata.get("parse"):
        return {str}
    hint = typing.get_type_hints(section)[key]
    parts = typing.get_args(hint) if typing.get_origin(hint) is not list else ()
    found = set()
    for part in parts or (hint,):
        found |= set(typing.get_args(part)) if typing.get_origin(part) is list else {part}
    return found - {type(None)}


# A one-step run of a tiny model, to pay a process's one-time costs (imports, tokenizer, token caches)
# before the budgets of compare's variants or tune's trials start.
WARM_UP = {"budget": None, "budget_flops": None, "max_tokens": None, "max_steps": 1, "size": None, "n_layer": 1, "d_model": 32,
           "n_head": 1, "context": 32, "micro_batch": 16, "batch_tokens": None, "compile": "off", "eval_every": "1",
           "eval_tokens": 512, "early_stop": None, "patience": 0, "save_every": None, "resume": None,
           "report_to": None}


FINETUNE_POOLINGS = ("mean", "last", "first")  # as budgetlm.models.classifier.POOLINGS


@dataclass
class FinetuneConfig(TrainingSettings):
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
    augment: str | None = opt(None, empty=True, help="EDA on the training split only, e.g. sr=0.1,ri=0.1,rs=0.1,rd=0.1,n=4")
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
    epochs: float | None = opt(None, above=0, help="stop after this many passes over the training split "
                               "(default: 3 for a pretrained body, no limit from scratch)")
    batch_size: int = opt(32, low=1, help="examples per optimizer step")
    micro_batch: int | None = opt(None, low=1,
                                  help="examples per forward pass; gradient accumulation fills --batch-size")
    optim: str | None = opt(None, help="optimizer (default adamw; lstm: adam)", choices=OPTIMIZERS)
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
    weight_decay: float | None = opt(None, low=0, help="weight decay on weight matrices, embeddings excepted (default "
                                     "0.01; lstm 0, as the guide's Adam)")
    beta2: float = opt(0.999, low=0, high=0.99999, help="Adam β2")
    eval_every: Every | None = opt(None, parse=Every.parse, help="evaluate every N steps or a duration like 60s "
                                   "(default: ~12 times a run)")
    early_stop: EarlyStop | None = opt(None, parse=EarlyStop.parse, help="metric,patience[,min_delta], e.g. "
                                       "val_loss,3: keep the best weights by that metric and stop after patience "
                                       "evaluations without improvement (default: keep the best val_accuracy, never "
                                       "stop early)")
    seed: int = opt(0, low=0, high=SEED_MAX, help="seed for initialization, data order and augmentation")
    split_seed: int | None = opt(None, low=0, high=SEED_MAX, help="seed of the stratified --val-fraction split (default: --seed)")
    members: int | str = opt("auto", parse=count_or_auto("--members", "members"), help="fine-tune this many times with seeds --seed, --seed+1, ... and keep, as one "
                       "model, the ensemble of those that raise its validation score (auto: a budgetlm GPT body "
                       "trains another member while the time left is at least 3/4 of the first member's, up to 4; "
                       "else 1)")
    strategy: str = opt("auto", help="under torchrun: ddp (a replica per process, what auto picks); fsdp does not "
                        "fine-tune yet", choices=("auto", "ddp", "fsdp"))


@dataclass
class FinetuneRunConfig:
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict:
        return plain(self)
