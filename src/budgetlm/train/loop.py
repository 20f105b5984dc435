"""The training loop, top to bottom: batch → forward → backward → clip → step → log / evaluate / save.

It knows nothing of what is being learned: a task (language modelling, classification) supplies
batches, the loss and the evaluation; the budget decides when to stop and drives the schedule.
Everything the loop must carry across a resume lives in `LoopState`."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from budgetlm.budget import Budget
from budgetlm.errors import UserError
from budgetlm.train.metrics import RunLog
from budgetlm.train.resume import Checkpoints, Snapshot
from budgetlm.train.runtime import Runtime, to_device
from budgetlm.train.schedule import Schedule
from budgetlm.train.selection import Verdict, judge
from budgetlm.train.signals import GracefulStop

WARMUP_STEPS = 2      # steps left out of the steady-state throughput (compilation, allocator warm-up)
FAULTS_BEFORE_ROLLBACK = 3
MAX_ROLLBACKS = 3


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
    schedule_clock: str = "time"      # time: progress through the whole budget; steps: step / planned steps
    eval_every_steps: int | None = None
    eval_every_s: float | None = None
    eval_batches: int | None = None   # per periodic evaluation; None: sized to eval_share of the budget
    eval_share: float = 0.005         # time budget share of one periodic evaluation
    monitor: str = "val_loss"
    monitor_mode: str = "min"         # min | max
    patience: int = 0
    min_delta: float = 0.0
    log_every_s: float = 5.0
    save_every_steps: int | None = None
    save_every_s: float | None = None
    l1: float = 0.0                   # L1 penalty on weight matrices, added to the mean loss
    ema: float = 0.0                  # decay per step of a moving average of the weights, which is what
                                      # gets evaluated and kept (0: off, the raw weights)
    ema_every: int = 4                # steps between updates of the average (each by the decay to that power):
                                      # the same average, at a fraction of the cost of reading all weights
    final_eval: bool = True           # score the kept weights on all validation batches after the loop (off: the
                                      # caller does, as pretraining's calibration)
    reserve_evals: float = 1.0        # evaluations of all validation batches the budget keeps time for after the loop
    after_s: float = 2.0              # and seconds for what the caller does after them (saving, plots)


@dataclass
class LoopState:
    """The loop's own state, JSON-able so that a checkpoint can carry it."""
    step: int = 0
    seen: int = 0                      # training units (tokens or examples)
    train_s: float = 0.0               # time in training steps (evaluation and saving excluded)
    steady_seen: int = 0               # units and time after the warm-up steps of each session
    steady_s: float = 0.0
    step_s: float | None = None        # moving average of one step's duration
    eval_s_per_batch: float = 0.0
    eval_batches: int | None = None
    last_eval_step: int = -1
    last_eval_time: float = -math.inf
    last_save_step: int = 0
    last_save_time: float = 0.0
    best_value: float | None = None
    best_metrics: dict = field(default_factory=dict)
    bad_evals: int = 0
    evals: list = field(default_factory=list)
    skipped_steps: int = 0             # updates skipped for a non-finite loss or gradient
    consecutive_faults: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0              # halved by each rollback after repeated faults

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["last_eval_time"] = None if math.isinf(self.last_eval_time) else self.last_eval_time
        return d

    @classmethod
    def from_json(cls, d: dict) -> "LoopState":
        d = dict(d)
        d["last_eval_time"] = -math.inf if d.get("last_eval_time") is None else d["last_eval_time"]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class FitResult:
    stop_reason: str
    state: LoopState
    best: dict = field(default_factory=dict)        # periodic-evaluation metrics of the kept weights
    final: dict = field(default_factory=dict)       # full-validation metrics of the kept weights
    checkpoint: str | None = None                   # the last checkpoint written, if any

    @property
    def steps(self) -> int:
        return self.state.step

    @property
    def seen(self) -> int:
        return self.state.seen

    @property
    def train_s(self) -> float:
        return self.state.train_s

    @property
    def per_s(self) -> float:
        """Steady-state units per second of training (warm-up steps excluded when there are others)."""
        s = self.state
        if s.steady_s > 0:
            return s.steady_seen / s.steady_s
        return s.seen / s.train_s if s.train_s > 0 else 0.0

    @property
    def overall_per_s(self) -> float:
        return self.state.seen / self.state.train_s if self.state.train_s > 0 else 0.0


@dataclass
class StepOutcome:
    """One optimizer step's summed loss and gradient norm, left on the device until `read`: reading
    waits for the step to finish, so the loop reads a step only after queueing the next."""
    units: int
    loss: torch.Tensor
    grad_norm: torch.Tensor | None       # None under the fp16 scaler, whose own skips are no faults
    step: int = 0                        # the loop's count after this step, and what it logs with it
    seen: int = 0
    progress: float = 0.0
    lr: float = 0.0
    _values: tuple[float, float | None] | None = None

    def read(self) -> tuple[float, float | None]:
        if self._values is None:
            self._values = (float(self.loss), None if self.grad_norm is None else float(self.grad_norm))
        return self._values


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def _shrink_after_oom(error: BaseException, device: torch.device, shrink: Callable[[], bool] | None,
                      give_up: str) -> None:
    """Return when `error` ran out of memory and `shrink` made the next try smaller; else raise."""
    if not is_out_of_memory(error):
        raise error
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if shrink is None or not shrink():
        raise UserError(give_up) from None


def fit(model: nn.Module, forward: Callable, task: Task, optimizer: torch.optim.Optimizer, cfg: FitConfig,
        budget: Budget, runtime: Runtime, log: RunLog, *, checkpoints: Checkpoints | None = None,
        resume: Snapshot | None = None, stop: GracefulStop | None = None,
        scaler: torch.amp.GradScaler | None = None, run_meta: dict | None = None,
        on_eval: Callable[[dict], bool] | None = None) -> FitResult:
    """Train until the budget, early stopping, a signal or persistent faults end it; leave the best
    weights in `model`. `on_eval(entry)` sees every periodic evaluation; returning True stops the
    run as "pruned" (hyperparameter search)."""
    device = runtime.device
    st = LoopState()
    best_state: dict[str, torch.Tensor] | None = None
    last_checkpoint: str | None = None
    session_steps = 0
    averaged = moving_average(model, cfg.ema, cfg.ema_every) if cfg.ema else None
    evaluated = averaged.module if averaged is not None else model
    if resume is not None:
        st = LoopState.from_json(resume.meta["loop"])
        model.load_state_dict(resume.model)
        if averaged is not None:
            if resume.averaged is None:
                raise UserError(f"checkpoint {resume.path} holds no moving average of the weights; resume with the "
                                "run's own settings (--ema 0: the raw weights) or start a new --out")
            averaged.load_state_dict(resume.averaged)
        optimizer.load_state_dict(resume.optimizer)
        cfg.schedule.load_state_dict(resume.meta.get("schedule", {}))
        if scaler is not None and resume.meta.get("scaler"):
            scaler.load_state_dict(resume.meta["scaler"])
        best_state = resume.best
        resume.restore_rng()
        last_checkpoint = str(resume.path)
    sign = 1.0 if cfg.monitor_mode == "min" else -1.0
    recent_loss, recent_units = 0.0, 0
    last_log = -math.inf
    pending: StepOutcome | None = None  # the last step, read once the next one is queued

    def evaluate(max_batches: int | None) -> dict:
        evaluated.eval()
        start = time.monotonic()
        while True:
            try:
                with torch.no_grad(), runtime.autocast():
                    metrics = task.evaluate(evaluated, max_batches)  # eager: a compiled graph would cost a second compile
                break
            except (RuntimeError, torch.OutOfMemoryError) as e:
                _shrink_after_oom(e, device, getattr(task, "halve_eval_batch", None),
                                  "out of memory while evaluating even one sequence at a time; use a smaller model "
                                  "or --context")
                log.message("warning: out of memory while evaluating; retrying with half the sequences per pass")
        n = max_batches or task.eval_batch_count()
        st.eval_s_per_batch = (time.monotonic() - start) / max(n, 1)
        model.train()
        return metrics

    def reserve_s() -> float:
        # the final evaluations on all validation batches, one periodic one, and saving
        return st.eval_s_per_batch * (cfg.reserve_evals * task.eval_batch_count() + (st.eval_batches or 0)) + cfg.after_s

    def record_eval(metrics: dict) -> bool:
        """Log an evaluation and keep the weights if they are the best so far. True: stop early."""
        nonlocal best_state
        value = sign * metrics[cfg.monitor]
        entry = {"step": st.step, task.unit: st.seen, "elapsed_s": budget.elapsed(), **metrics}
        st.evals.append(entry)
        st.last_eval_step, st.last_eval_time = st.step, budget.elapsed()
        log.record(kind="eval", **entry)
        verdict = judge(value, st.best_value, noise=metrics.get(f"{cfg.monitor}_se", 0.0), min_delta=cfg.min_delta)
        if verdict is Verdict.WORSE:
            st.bad_evals += 1
        else:  # on a change within the noise the newer weights are kept, the best figure stays the reference
            if verdict is Verdict.BETTER:
                st.best_value, st.bad_evals = value, 0
            st.best_metrics = dict(entry)
            best_state = {k: v.detach().clone() for k, v in evaluated.state_dict().items()}
        return cfg.patience > 0 and st.bad_evals >= cfg.patience

    def save_checkpoint() -> None:
        nonlocal last_checkpoint
        if checkpoints is None:
            return
        meta = {"loop": st.to_json(), "schedule": cfg.schedule.state_dict(), "spent_s": budget.elapsed(),
                "scaler": scaler.state_dict() if scaler is not None else None, **(run_meta or {})}
        last_checkpoint = str(checkpoints.save(st.step, model=model.state_dict(), best=best_state,
                                               optimizer=optimizer.state_dict(), meta=meta,
                                               averaged=averaged.state_dict() if averaged is not None else None))
        st.last_save_step, st.last_save_time = st.step, budget.elapsed()

    def roll_back() -> None:
        """After repeated faults: weights and optimizer state back to the last checkpoint (or the
        best weights), the learning rate halved, and the data going on past the batches that failed
        (as PaLM does after a loss spike), since replaying them could fail again."""
        path = checkpoints.latest_valid() if checkpoints is not None else None
        if path is not None:
            from budgetlm.train.resume import load_snapshot
            snap = load_snapshot(path)
            model.load_state_dict(snap.model)
            optimizer.load_state_dict(snap.optimizer)
        elif best_state is not None:
            model.load_state_dict(best_state)
            optimizer.state.clear()
        st.lr_scale *= 0.5
        st.rollbacks += 1
        st.consecutive_faults = 0
        log.message(f"warning: {FAULTS_BEFORE_ROLLBACK} non-finite steps in a row; weights rolled back to "
                    f"{path.name if path else 'the best so far'}, learning rate halved, data continues at step {st.step}")
        log.record(kind="rollback", step=st.step, elapsed_s=budget.elapsed(), lr_scale=st.lr_scale,
                   restored=str(path) if path else "best")

    def account(outcome: StepOutcome) -> str | None:
        """Count a finished step: a fault (and after repeated faults a rollback) or its loss, and log
        it. Returns "diverged" when faults persist after every rollback."""
        nonlocal recent_loss, recent_units, last_log
        loss, grad_norm = outcome.read()
        if not (math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))):
            st.skipped_steps += 1
            st.consecutive_faults += 1
            log.record(kind="fault", step=outcome.step, elapsed_s=budget.elapsed(), loss=_json_number(loss),
                       grad_norm=_json_number(grad_norm), skipped_steps=st.skipped_steps)
            if st.consecutive_faults >= FAULTS_BEFORE_ROLLBACK:
                if st.rollbacks >= MAX_ROLLBACKS:
                    log.message(f"error: training keeps producing non-finite values after {MAX_ROLLBACKS} rollbacks "
                                "with a halved learning rate; stopping and keeping the best weights. Try a lower --lr, "
                                "--precision fp32 or a smaller --grad-clip.")
                    return "diverged"
                roll_back()
            return None
        st.consecutive_faults = 0
        recent_loss += loss
        recent_units += outcome.units
        now = budget.elapsed()
        if now - last_log >= cfg.log_every_s or outcome.step == 1:
            train_loss = recent_loss / max(recent_units, 1)
            rate = st.seen / st.train_s
            log.record(kind="train", step=outcome.step, **{task.unit: outcome.seen}, elapsed_s=now, lr=outcome.lr,
                       train_loss=train_loss, **{f"{task.unit}_per_s": rate}, grad_norm=_json_number(grad_norm),
                       skipped_steps=st.skipped_steps)
            log.show(outcome.progress, loss=train_loss, val=_val_text(st.evals[-1]), rate=rate, unit=task.unit,
                     left_s=budget.remaining())
            last_log, recent_loss, recent_units = now, 0.0, 0
        return None

    def settle() -> str | None:
        """Account for the step still in flight, if any (before evaluating, saving or stopping)."""
        nonlocal pending
        if pending is None:
            return None
        outcome, pending = pending, None
        started = time.monotonic()
        outcome.read()
        st.train_s += time.monotonic() - started  # the wait is the rest of that step's time
        return account(outcome)

    # Size the periodic evaluation from the time of two batches (after one to warm up or compile).
    if st.eval_batches is None:
        st.eval_batches = cfg.eval_batches
    if st.eval_batches is None:
        st.eval_batches = task.eval_batch_count()
        if budget.seconds:
            evaluate(1)
            evaluate(2)
            affordable = int(cfg.eval_share * budget.seconds / max(st.eval_s_per_batch, 1e-6))
            st.eval_batches = max(1, min(task.eval_batch_count(), affordable))
    if not st.evals:
        record_eval(evaluate(st.eval_batches))
    model.train()
    stop_reason = None

    while True:
        stop_reason = budget.exhausted(st.step, st.seen, next_step_s=st.step_s or 0.0, reserve_s=reserve_s())
        if stop_reason:
            if st.step == 0 and stop_reason == "budget":
                raise UserError(f"the budget of {budget.seconds:g}s ran out before the first training step "
                                f"({budget.elapsed():.1f}s went to setup and the first evaluation); give a larger --budget")
            break
        if stop is not None and stop.requested:
            stop_reason = "interrupted"
            break
        progress = budget.progress(st.step, st.seen, reserve_s=reserve_s(), clock=cfg.schedule_clock,
                                   step_s=st.step_s)
        lr = cfg.lr * cfg.schedule.factor(progress, st.step) * st.lr_scale
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

        # One optimizer step over micro_steps micro-batches, the loss weighted by units, so the
        # update equals that of the whole batch at once.
        started = time.monotonic()
        try:
            outcome = _train_step(model, forward, task, optimizer, cfg, runtime, st.step, scaler)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if is_out_of_memory(e):
                optimizer.zero_grad(set_to_none=True)  # the partial gradients hold memory too
            _shrink_after_oom(e, device, getattr(task, "halve_micro_batch", None),
                              "out of memory even at the smallest micro-batch; use a smaller model, --context "
                              "or --micro-batch")
            cfg.micro_steps *= 2
            log.message(f"warning: out of memory; retrying with micro-batch {task.micro_batch} × {cfg.micro_steps}")
            continue
        st.step += 1
        st.seen += outcome.units
        outcome.step, outcome.seen, outcome.progress, outcome.lr = st.step, st.seen, progress, lr
        if averaged is not None and st.step % cfg.ema_every == 0:
            averaged.update_parameters(model)  # a skipped step left the weights as they were
        # The previous step's numbers are read only now that this one is queued, so a GPU never
        # waits for the host; on a CPU both are already computed.
        previous, pending = pending, outcome
        if previous is not None:
            previous.read()
        duration = time.monotonic() - started
        st.train_s += duration
        session_steps += 1
        if session_steps > WARMUP_STEPS:
            st.steady_seen += outcome.units
            st.steady_s += duration
        st.step_s = duration if st.step_s is None or session_steps <= WARMUP_STEPS else 0.8 * st.step_s + 0.2 * duration
        if previous is not None and account(previous) == "diverged":
            stop_reason = "diverged"
            break

        now = budget.elapsed()
        due = (cfg.eval_every_steps and st.step - st.last_eval_step >= cfg.eval_every_steps) or \
              (cfg.eval_every_s and now - st.last_eval_time >= cfg.eval_every_s)
        if due:
            if settle() == "diverged":
                stop_reason = "diverged"
                break
            metrics = evaluate(st.eval_batches)
            early = record_eval(metrics)
            if hasattr(cfg.schedule, "observe"):
                cfg.schedule.observe(sign * metrics[cfg.monitor])
            log.show(progress, loss=None, val=_val_text(metrics), rate=st.seen / st.train_s, unit=task.unit,
                     left_s=budget.remaining(), force=True)
            if early:
                stop_reason = "early_stop"
                break
            if on_eval is not None and on_eval(st.evals[-1]):
                stop_reason = "pruned"
                break
        if (cfg.save_every_steps and st.step - st.last_save_step >= cfg.save_every_steps) or \
           (cfg.save_every_s and budget.elapsed() - st.last_save_time >= cfg.save_every_s):
            if settle() == "diverged":
                stop_reason = "diverged"
                break
            save_checkpoint()

    if stop_reason != "diverged" and settle() == "diverged":
        stop_reason = "diverged"
    if stop_reason == "interrupted":
        save_checkpoint()
    elif st.last_eval_step != st.step:  # the last weights, unless just evaluated
        record_eval(evaluate(st.eval_batches))
    if stop_reason not in ("interrupted",) and checkpoints is not None and (cfg.save_every_steps or cfg.save_every_s):
        save_checkpoint()
    model.load_state_dict(best_state)
    if stop_reason == "interrupted":
        final = {k: v for k, v in st.best_metrics.items() if k.startswith("val_")}
    elif st.eval_batches < task.eval_batch_count() and cfg.final_eval:
        final = evaluate(None)
    else:
        final = {k: v for k, v in st.best_metrics.items() if k.startswith("val_")}
    if cfg.final_eval and stop_reason != "interrupted":
        log.record(kind="final", step=st.step, **{task.unit: st.seen}, elapsed_s=budget.elapsed(),
                   best_step=st.best_metrics.get("step"), **{**final, "val_full": True})
    log.close()
    return FitResult(stop_reason=stop_reason, state=st, best=st.best_metrics, final=final, checkpoint=last_checkpoint)


def _train_step(model, forward, task, optimizer, cfg: FitConfig, runtime: Runtime, step: int,
                scaler: torch.amp.GradScaler | None) -> StepOutcome:
    """One optimizer step, queued without waiting for the device where the optimizer allows it; the
    update is skipped when the loss or gradient is not finite."""
    batches = [task.batch(step, m) for m in range(cfg.micro_steps)]
    units = sum(task.count(b) for b in batches)
    step_loss = torch.zeros((), device=runtime.device)
    if cfg.l1 > 0:
        # added once per step, so its weight does not depend on the number of micro-batches
        penalty = cfg.l1 * sum(p.abs().sum() for p in model.parameters() if p.dim() >= 2 and p.requires_grad)
        (scaler.scale(penalty) if scaler is not None else penalty).backward()
    for b in batches:
        b = tuple(to_device(t, runtime.device) for t in b)
        with runtime.autocast():
            loss_sum = task.loss(forward, b)
        scaled = loss_sum / units
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        step_loss += loss_sum.detach().float()
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if scaler is not None:
        # the scaler skips steps with inf/nan gradients itself and lowers its scale
        scaler.step(optimizer)
        scaler.update()
        grad_norm = None
    elif decides_on_device(optimizer, runtime.device):
        optimizer.found_inf = (~(torch.isfinite(step_loss) & torch.isfinite(grad_norm))).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif math.isfinite(float(step_loss)) and math.isfinite(float(grad_norm)):  # the others decide on the host
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(units, step_loss, grad_norm)


def decides_on_device(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """Whether a step's skip (non-finite loss or gradient) is decided on the device: where the
    optimizer takes GradScaler's `found_inf` (fused AdamW, Adam and SGD; budgetlm's Muon), as the
    whole update is then skipped (step count included) without the host reading the loss and so
    waiting for the GPU. A CPU has computed both already, so there the host decides, at no cost."""
    return device.type != "cpu" and getattr(optimizer, "_step_supports_amp_scaling", False)


class MovingAverage(nn.Module):
    """An exponential moving average of a model's weights (Polyak averaging): `module` holds the
    average, `n_averaged` the updates so far; the state dict is laid out as torch's AveragedModel's.
    Written here because AveragedModel reads its update count on the host, which makes each update
    wait for a GPU to finish its queue."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model)
        self.decay = decay
        device = next(model.parameters()).device
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averages, current = list(self.module.parameters()), [p.detach() for p in model.parameters()]
        # The decay ramps up as (1 + n) / (10 + n), so early evaluations do not see an average
        # dominated by the initial weights; the first update copies.
        if self.n_averaged.device.type == "cpu":  # reading the count costs nothing here
            n = int(self.n_averaged)
            torch._foreach_lerp_(averages, current, 1.0 if n == 0 else 1.0 - min(self.decay, (1.0 + n) / (10.0 + n)))
        else:
            n = self.n_averaged.float()
            rate = torch.where(n == 0, 1.0, 1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=self.decay))
            # average += rate · (current − average): _foreach_lerp_ with a tensor weight reads it on the
            # host, and three list kernels cost a GPU less than one kernel per tensor (13× a lerp on a CPU)
            torch._foreach_add_(averages, torch._foreach_mul(torch._foreach_sub(current, averages), rate))
        buffers = list(self.module.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))
        self.n_averaged += 1


def moving_average(model: nn.Module, decay: float, every: int = 1) -> MovingAverage:
    """The moving average of `model`'s weights, `decay` per step, updated every `every` steps (each
    update by the decay to that power). Evaluated in place of the raw weights, it smooths out the
    noise of the last steps, worth most to small, noisy datasets."""
    if not 0 < decay < 1:
        raise UserError(f"--ema must lie in (0, 1), e.g. 0.999; got {decay}")
    return MovingAverage(model, decay**every)


def _val_text(metrics: dict) -> str:
    for key, label in (("val_bpb", "val bpb"), ("val_accuracy", "val acc"), ("val_loss", "val loss")):
        if metrics.get(key) is not None:
            return f"{label} {metrics[key]:.3f}"
    return ""


def _json_number(x: float | None):
    return x if x is None or math.isfinite(x) else str(x)
