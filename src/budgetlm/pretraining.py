"""Pretraining's setup, up to its first step: what `budgetlm pretrain` trains and `budgetlm plan` shows, made by
one function so that the two cannot differ.

data (prepare.py) → plan (speed probe, memory cap; rank 0's under torchrun, a resumed run's own) → the model's
config → BPE-dropout → the model → batch (micro-batch search) → compile decision → the plan record."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from budgetlm.budget import Budget
from budgetlm.config import RunConfig
from budgetlm.data.tokens import bpe_dropout_tokens
from budgetlm.errors import UserError
from budgetlm.models.config import ModelConfig
from budgetlm.models.registry import ARCHS
from budgetlm.plan import (
    Plan,
    batch_settings,
    bpe_dropout_setting,
    budget_fields,
    data_fields,
    given_or_planned,
    model_for,
    plan_on_device,
    plan_record,
    planned_lr,
    shape_given,
)
from budgetlm.prepare import TrainingData, prepare
from budgetlm.report import say
from budgetlm.train.batching import largest_micro_batch
from budgetlm.train.compile import CompileDecision, decide as decide_compile
from budgetlm.train.kernels import apply_kernels
from budgetlm.train.parallel import Parallel, main_first
from budgetlm.train.resume import Snapshot
from budgetlm.train.runtime import autocast, device_name


@dataclasses.dataclass
class Pretraining:
    data: TrainingData
    planned: Plan | None     # None where flags fix the shape or no budget of time or FLOPs is given
    config: ModelConfig
    model: nn.Module         # on the device; on the meta device (counts only) for a dry setup
    train_tokens: np.ndarray  # the training stream, re-segmented where BPE-dropout is on
    bpe_rate: float
    bpe_passes: int
    identity: dict           # what a checkpoint must match to continue this run
    batch_tokens: int
    micro_batch: int | None  # this process's (None: a dry setup's, left to pretrain's search)
    micro_steps: int | None
    sequences: int | None    # per optimizer step, over all processes
    compiling: CompileDecision
    lr: float
    ema: float               # the weights' moving average: the flag's, else the plan's (0: none)
    record: dict             # the plan as plan.json and `budgetlm plan --json` give it


def set_up(cfg: RunConfig, budget: Budget, device: torch.device, precision: str, *, dry: bool = False,
           parallel: Parallel | None = None, snapshot: Snapshot | None = None,
           resumed_tokenizer: Path | None = None) -> Pretraining:
    """Pretraining's setup for `cfg` within `budget`. `dry`: for `budgetlm plan`: the model only counted (on the
    meta device), no micro-batch search and no BPE-dropout segmentations drawn. `snapshot`: the checkpoint a
    resumed run continues (its plan is kept, and it must belong to this run)."""
    t = cfg.train
    # the other processes read what the first tokenized into the cache
    with main_first(parallel):
        data = prepare(cfg, budget, resumed_tokenizer=resumed_tokenizer, device=device, precision=precision)
    tokenizer, train_tokens, val_tokens = data.tokenizer, data.train_tokens, data.val_tokens

    planned = None
    if (budget.seconds or budget.max_flops) and not shape_given(cfg.model):
        # a resumed run keeps the plan its first session made for the whole budget; planning again
        # for the time left could pick another shape, which the checkpoint cannot continue
        planned = Plan.from_dict(snapshot.meta.get("plan")) if snapshot is not None else None
        if planned is None and (parallel is None or parallel.main):
            planned = plan_on_device(budget.remaining(), train_tokens=data.unique_tokens,
                                     vocab=tokenizer.get_vocab_size(), device=device, precision=precision,
                                     micro_batch=t.micro_batch, budget_flops=t.budget_flops, optim=t.optim,
                                     clock=budget.remaining, peak_flops=data.peak_flops,
                                     arch=cfg.model.arch, mask_rate=t.mask_rate)
        if parallel is not None:  # the first process plans for all
            planned = parallel.share(planned)
        say(planned.describe())
    mc = model_for(cfg.model, tokenizer.get_vocab_size(), planned)
    if mc.d_model % mc.n_head:
        raise UserError(f"--d-model {mc.d_model} is not divisible by --n-head {mc.n_head}; choose sizes that divide")
    if mc.canon == 1:
        raise UserError("--canon 1 would mix a position with itself only; give 0 (off) or a kernel of 2 or more")
    if len(val_tokens) < mc.context + 1:
        raise UserError(f"the validation text has {len(val_tokens)} tokens, fewer than one context window "
                        f"({mc.context + 1}); give more validation text (--val, --val-fraction) or a smaller --context")
    if len(train_tokens) < 2 * mc.context + 2:
        raise UserError(f"the training text has {len(train_tokens)} tokens, too few for two context windows of "
                        f"{mc.context}; give more text or a smaller --context")
    bpe_rate, passes = bpe_dropout_setting(cfg.data, tokenizer, planned)
    identity = {"model": mc.to_dict(), "train_tokens": Path(train_tokens.filename).name,
                "vocab_asked": cfg.data.vocab_size, "bpe_dropout": bpe_rate, "bpe_passes": passes,
                "plan": dataclasses.asdict(planned) if planned is not None else None}
    if snapshot is not None:
        check_same_run(snapshot, identity)
    if bpe_rate and not dry:
        started = time.monotonic()
        with main_first(parallel):
            train_tokens, drawn = bpe_dropout_tokens(data.train_texts(), tokenizer, train_tokens, bpe_rate, passes,
                                                     t.seed)
        if drawn:
            if snapshot is not None:
                say("the BPE-dropout segmentations this run started with are no longer cached: drew new ones, so "
                    "the resumed run reads other segmentations of the same text")
            say(f"re-segmented the training text {passes} times with BPE-dropout {bpe_rate:g} in "
                f"{time.monotonic() - started:.1f}s")

    with torch.device("meta") if dry else contextlib.nullcontext():  # meta: counts only, no memory for the weights
        model = ARCHS[mc.arch][0](mc)
    batch_tokens, micro_batch = batch_settings(t.batch_tokens, t.micro_batch, mc.context, planned)
    if not dry:
        model.to(device)
        apply_kernels(model, device)
        if micro_batch is None:
            micro_batch = largest_micro_batch(model, model, mc.context, mc.vocab_size, batch_tokens, device,
                                              functools.partial(autocast, device, precision))
    micro_steps = max(1, round(batch_tokens / (micro_batch * mc.context))) if micro_batch else None
    compiling = decide_compile(t.compile, mc, micro_batch or 8, device, precision, budget.remaining(),
                               processes=parallel.world if parallel is not None else 1)
    sequences = micro_batch * micro_steps if micro_batch else None
    if parallel is not None:
        micro_batch, micro_steps = parallel.split_batch(parallel.share(micro_batch), micro_steps)
    lr = planned_lr(t.lr, mc.d_model, batch_tokens, t.optim, planned)
    ema = given_or_planned(t.ema, planned, "ema", 0.0)
    record = plan_record(planned, mc, n_params=model.num_params(), n_params_without_embedding=model.num_params(False),
                         flops_per_token_=model.flops_per_token(), device=device_name(device), precision=precision,
                         compiled=compiling.compile, compile_reason=compiling.reason, budget=budget_fields(t),
                         data=data_fields(data, bpe_rate, passes), ema=ema,
                         batch_tokens=sequences * mc.context if sequences else batch_tokens,
                         micro_batch=micro_batch, micro_steps=micro_steps, lr=lr, warmup=t.warmup, optim=t.optim,
                         schedule=t.schedule)
    return Pretraining(data, planned, mc, model, train_tokens, bpe_rate, passes, identity, batch_tokens, micro_batch,
                       micro_steps, sequences, compiling, lr, ema, record)


def check_same_run(snapshot: Snapshot, identity: dict) -> None:
    saved = snapshot.meta.get("model")
    if saved != identity["model"]:
        diff = {k: (saved.get(k) if saved else None, v) for k, v in identity["model"].items()
                if not saved or saved.get(k) != v}
        raise UserError(f"checkpoint {snapshot.path} belongs to another model (checkpoint vs now: {diff}); "
                        "resume with the same model flags or start a new --out")
    asked = snapshot.meta.get("vocab_asked")
    if identity["vocab_asked"] and asked != identity["vocab_asked"]:
        raise UserError(f"checkpoint {snapshot.path} was trained with a tokenizer of "
                        f"{'--vocab-size ' + str(asked) if asked else 'the default vocabulary size'}, not --vocab-size "
                        f"{identity['vocab_asked']}; resume with the same --vocab-size or start a new --out")
    saved_bpe = (snapshot.meta.get("bpe_dropout", 0.0), snapshot.meta.get("bpe_passes", 0))
    if saved_bpe != (identity["bpe_dropout"], identity["bpe_passes"]):
        raise UserError(f"checkpoint {snapshot.path} was trained with BPE-dropout {saved_bpe[0]:g} over "
                        f"{saved_bpe[1]} passes, not {identity['bpe_dropout']:g} over {identity['bpe_passes']}; "
                        "resume with the same --bpe-dropout and --bpe-passes or start a new --out")
    if snapshot.meta.get("train_tokens") != identity["train_tokens"]:
        raise UserError(f"checkpoint {snapshot.path} was trained on other data; resume with the same --data "
                        "or start a new --out")
