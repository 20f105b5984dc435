"""`budgetlm plan`: the plan pretrain would follow, and its reasons, without training.

setup (device, data, tokenizer, plan, model, batch, compile decision: pretrain's own, from pretraining.py, with the
model only counted) → print as text or JSON."""

from __future__ import annotations

import json

from budgetlm.budget import Budget
from budgetlm.config import RunConfig
from budgetlm.plan import plan_text
from budgetlm.pretraining import set_up
from budgetlm.report import say
from budgetlm.train.runtime import pick_device, pick_precision, set_threads


def run(cfg: RunConfig, *, as_json: bool = False) -> dict:
    """Print the plan for `cfg` (text, or JSON with `as_json`) and return its record."""
    t = cfg.train
    budget = Budget(seconds=t.budget, max_steps=t.max_steps, max_tokens=t.max_tokens, max_flops=t.budget_flops)
    set_threads(t.threads)
    device = pick_device(t.device)
    precision = pick_precision(t.precision, device)
    record = set_up(cfg, budget, device, precision, dry=True).record
    if as_json:
        print(json.dumps(record, indent=2), flush=True)
    else:
        say(f"planned in {budget.elapsed():.1f}s")
        print(plan_text(record), flush=True)
    return record
