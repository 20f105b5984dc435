"""The training loop, top to bottom: batch → forward → backward → clip → step → log / evaluate.

It knows nothing of what is being learned: a task (language modelling, classification) supplies
batches, the loss and the evaluation; the budget decides when to stop and drives the schedule."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from budgetlm.budget import Budget
from budgetlm.train.metrics import RunLog
from budgetlm.train.runtime import Runtime
from budgetlm.train.schedule import Schedule


class Task(Protocol):
    unit: str  # what `count` counts: "tokens" or "examples"

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, ...]: ...
    def count(self, batch: tuple[torch.Tensor, ...]) -> int: ...
    def loss(self, forward: Callable, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Summed (not averaged) loss over the batch's `count` units."""
    def evaluate(self, forward: Callable, max_batches: int | None) -> dict[str, float]:
        """Validation metrics, including `val_loss`, on the first `max_batches` batches (None: all)."""
    def eval_batch_count(self) -> int: ...


@dataclass
class FitConfig:
    lr: float
    schedule: Schedule
    micro_steps: int = 1
    grad_clip: float = 1.0
    eval_every_steps: int | None = None
    eval_every_s: float | None = None
    eval_batches: int | None = None   # per periodic evaluation; None: sized to eval_share of the budget
    eval_share: float = 0.005         # time budget share of one periodic evaluation
    monitor: str = "val_loss"         # lower is better
    patience: int = 0
    min_delta: float = 0.0
    log_every_s: float = 5.0


@dataclass
class FitResult:
    stop_reason: str
    steps: int
    seen: int                  # training units (tokens or examples)
    train_s: float             # time in training steps only (evaluation excluded)
    best: dict = field(default_factory=dict)        # periodic-evaluation metrics of the kept weights
    final: dict = field(default_factory=dict)       # full-validation metrics of the kept weights
    evals: list = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.seen / self.train_s if self.train_s > 0 else 0.0


def _to_device(batch, device):
    return tuple(t.to(device, non_blocking=True) for t in batch)


def fit(model: nn.Module, forward: Callable, task: Task, optimizer: torch.optim.Optimizer, cfg: FitConfig,
        budget: Budget, runtime: Runtime, log: RunLog) -> FitResult:
    device = runtime.device
    step, seen, train_s = 0, 0, 0.0
    step_s = None          # moving average of one optimizer step's duration
    eval_s_per_batch = 0.0
    last_log = last_eval_time = -math.inf
    last_eval_step = 0
    recent_loss, recent_units = 0.0, 0
    best_value, best_state, best_metrics, bad_evals = math.inf, None, {}, 0
    evals: list[dict] = []
    stop_reason = None

    def evaluate(max_batches: int | None) -> dict:
        nonlocal eval_s_per_batch
        model.eval()
        start = time.monotonic()
        with torch.no_grad(), runtime.autocast():
            metrics = task.evaluate(forward, max_batches)
        n = max_batches or task.eval_batch_count()
        eval_s_per_batch = (time.monotonic() - start) / max(n, 1)
        model.train()
        return metrics

    def reserve_s() -> float:
        # the final evaluation on all validation batches, one periodic one, and saving
        return eval_s_per_batch * (task.eval_batch_count() + (cfg.eval_batches or 0)) + 2.0

    def record_eval(metrics: dict) -> bool:
        """Log an evaluation; keep the weights if they are the best so far. True: stop early."""
        nonlocal best_value, best_state, best_metrics, bad_evals
        value = metrics[cfg.monitor]
        entry = {"step": step, "tokens" if task.unit == "tokens" else "examples": seen,
                 "elapsed_s": budget.elapsed(), **metrics}
        evals.append(entry)
        log.record(kind="eval", **entry)
        if value < best_value - cfg.min_delta or best_state is None:
            best_value, best_metrics, bad_evals = value, dict(entry), 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_evals += 1
        return cfg.patience > 0 and bad_evals >= cfg.patience

    # Size the periodic evaluation: time two batches (after one to warm up or compile).
    if cfg.eval_batches is None:
        if budget.seconds:
            evaluate(1)
            evaluate(2)
            affordable = int(cfg.eval_share * budget.seconds / max(eval_s_per_batch, 1e-6))
            cfg.eval_batches = max(1, min(task.eval_batch_count(), affordable))
        else:
            cfg.eval_batches = task.eval_batch_count()
    record_eval(evaluate(cfg.eval_batches))
    last_eval_time = budget.elapsed()
    model.train()

    while True:
        stop_reason = budget.exhausted(step, seen, next_step_s=step_s or 0.0, reserve_s=reserve_s())
        if stop_reason:
            break
        progress = budget.progress(step, seen, reserve_s=reserve_s())
        lr = cfg.lr * cfg.schedule.factor(progress, step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

        # One optimizer step over micro_steps micro-batches, the loss weighted by units, so the
        # update equals that of the whole batch at once.
        started = time.monotonic()
        batches = [task.batch(step, m) for m in range(cfg.micro_steps)]
        units = sum(task.count(b) for b in batches)
        step_loss = torch.zeros((), device=device)
        for b in batches:
            with runtime.autocast():
                loss_sum = task.loss(forward, _to_device(b, device))
            (loss_sum / units).backward()
            step_loss += loss_sum.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()  # honest step timing (once per step, not per kernel)
        duration = time.monotonic() - started
        train_s += duration
        step_s = duration if step_s is None or step < 2 else 0.8 * step_s + 0.2 * duration
        step += 1
        seen += units
        recent_loss += step_loss.item()
        recent_units += units

        now = budget.elapsed()
        if now - last_log >= cfg.log_every_s or step == 1:
            train_loss = recent_loss / max(recent_units, 1)
            log.record(kind="train", step=step, **{task.unit: seen}, elapsed_s=now, lr=lr,
                       train_loss=train_loss, tokens_per_s=seen / train_s if task.unit == "tokens" else None,
                       examples_per_s=seen / train_s if task.unit == "examples" else None)
            log.show(progress, loss=train_loss, val_bpb=best_metrics.get("val_bpb"), tokens_per_s=seen / train_s,
                     left_s=budget.remaining())
            last_log, recent_loss, recent_units = now, 0.0, 0

        due = (cfg.eval_every_steps and step - last_eval_step >= cfg.eval_every_steps) or \
              (cfg.eval_every_s and now - last_eval_time >= cfg.eval_every_s)
        if due:
            stop = record_eval(evaluate(cfg.eval_batches))
            last_eval_time, last_eval_step = budget.elapsed(), step
            log.show(progress, loss=None, val_bpb=evals[-1].get("val_bpb"), tokens_per_s=seen / train_s,
                     left_s=budget.remaining(), force=True)
            if stop:
                stop_reason = "early_stop"
                break

    if last_eval_step != step:  # the last weights, unless just evaluated
        record_eval(evaluate(cfg.eval_batches))
    model.load_state_dict(best_state)
    final = evaluate(None) if cfg.eval_batches < task.eval_batch_count() else {
        k: v for k, v in best_metrics.items() if k.startswith("val_")}
    log.close()
    return FitResult(stop_reason=stop_reason, steps=step, seen=seen, train_s=train_s,
                     best=best_metrics, final=final, evals=evals)
