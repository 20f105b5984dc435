"""`budgetlm plan`: the plan pretrain would follow, and its reasons, without training.

setup (device, data, tokenizer: the same as pretrain's, cached) → plan (memory cap, speed probe) → the
model, batch and rate pretrain would derive → print as text or JSON."""

from __future__ import annotations

import json

import torch

from budgetlm.budget import Budget
from budgetlm.config import RunConfig
from budgetlm.models.registry import ARCHS
from budgetlm.plan import (
    batch_settings,
    bpe_dropout_setting,
    budget_fields,
    data_fields,
    given_or_planned,
    model_for,
    plan_on_device,
    plan_record,
    plan_text,
    planned_lr,
    shape_given,
)
from budgetlm.prepare import prepare
from budgetlm.report import say
from budgetlm.train.compile import decide as decide_compile
from budgetlm.train.runtime import (
    device_name,
    pick_device,
    pick_precision,
    set_threads,
)


def run(cfg: RunConfig, *, as_json: bool = False) -> dict:
    """Print the plan for `cfg` (text, or JSON with `as_json`) and return its record."""
    t = cfg.train
    budget = Budget(seconds=t.budget, max_steps=t.max_steps, max_tokens=t.max_tokens, max_flops=t.budget_flops)
    set_threads(t.threads)
    device = pick_device(t.device)
    precision = pick_precision(t.precision, device)
    text = prepare(cfg, budget, resumed_tokenizer=None, device=device, precision=precision)
    vocab = text.tokenizer.get_vocab_size()
    planned = None
    if (budget.seconds or budget.max_flops) and not shape_given(cfg.model):
        planned = plan_on_device(budget.remaining(), train_tokens=text.unique_tokens, vocab=vocab, device=device,
                                 precision=precision, micro_batch=t.micro_batch, budget_flops=t.budget_flops,
                                 optim=t.optim, clock=budget.remaining, peak_flops=text.peak_flops,
                                 arch=cfg.model.arch, mask_rate=t.mask_rate)
    mc = model_for(cfg.model, vocab, planned)
    with torch.device("meta"):  # counts only: no memory for the weights
        model = ARCHS[mc.arch][0](mc)
    bpe_rate, passes = bpe_dropout_setting(cfg.data, text.tokenizer, planned)
    batch_tokens, micro_batch = batch_settings(t.batch_tokens, t.micro_batch, mc.context, planned)
    micro_steps = max(1, round(batch_tokens / (micro_batch * mc.context))) if micro_batch else None
    compiling = decide_compile(t.compile, mc, micro_batch or 8, device, precision, budget.remaining())
    record = plan_record(planned, mc, n_params=model.num_params(), n_params_without_embedding=model.num_params(False),
                         flops_per_token_=model.flops_per_token(), device=device_name(device), precision=precision,
                         compiled=compiling.compile, compile_reason=compiling.reason,
                         budget=budget_fields(t), data=data_fields(text, bpe_rate, passes),
                         ema=given_or_planned(t.ema, planned, "ema", 0.0),
                         batch_tokens=micro_steps * micro_batch * mc.context if micro_batch else batch_tokens,
                         micro_batch=micro_batch, micro_steps=micro_steps,
                         lr=planned_lr(t.lr, mc.d_model, batch_tokens, t.optim, planned), warmup=t.warmup,
                         optim=t.optim, schedule=t.schedule)
    if as_json:
        print(json.dumps(record, indent=2), flush=True)
    else:
        say(f"planned in {budget.elapsed():.1f}s")
        print(plan_text(record), flush=True)
    return record
