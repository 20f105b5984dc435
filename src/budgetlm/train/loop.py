"""The training loop, top to bottom: batch → forward → backward → clip → step → log / evaluate / save.

It knows nothing of what is being learned: a task (language modelling, classification) supplies
batches, the loss and the evaluation. `fit` reads in one screen: each step it asks `Decisions` — one
object, one clock — for the learning rate and whether to stop, evaluate or save, and `Trainer` carries
them out. Everything the loop must carry across a resume lives in `LoopState`."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from budgetlm.budget import Budget, EarlyStop, Every
from budgetlm.errors import UserError
from budgetlm.train.metrics import RunLog
from budgetlm.train.parallel import Parallel, clip_gradients
from budgetlm.train.resume import Checkpoints, Snapshot, is_sharded, load_sharded, load_snapshot, save_sharded
from budgetlm.train.runtime import Runtime, to_device
from budgetlm.train.schedule import Schedule
from budgetlm.train.selection import Verdict, judge
from budgetlm.train.signals import GracefulStop

WARMUP_STEPS = 2      # steps left out of the steady-state throughput (compilation, allocator warm-up)
FAULTS_BEFORE_ROLLBACK = 3
MAX_ROLLBACKS = 3


class Task(Protocol):
    unit: str  # what `consumed` counts: "tokens" or "examples"

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, ...]: ...
    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        """The batch's units that carry a loss (a BERT's masked tokens, a T5's targets): what the loss is divided by."""
    def consumed(self, batch: tuple[torch.Tensor, ...]) -> int:
        """The units of data the batch read (tokens of text, examples): what budgets, rates and epochs count."""
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
    eval_every: Every | None = None
    eval_batches: int | None = None   # per periodic evaluation; None: sized to eval_share of the budget
    eval_share: float = 0.005         # time budget share of one periodic evaluation
    stopping: EarlyStop = field(default_factory=EarlyStop)
    log_every_s: float = 5.0
    save_every: Every | None = None
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
    seen: int = 0                      # training data read (tokens of text or examples)
    micro_steps: int = 0               # micro-batches per step (doubled after running out of memory)
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
    units: int                           # that carry a loss
    consumed: int                        # of data read
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


def fit(model: nn.Module, forward: Callable, task: Task, optimizer: torch.optim.Optimizer, cfg: FitConfig,
        budget: Budget, runtime: Runtime, log: RunLog, *, checkpoints: Checkpoints | None = None,
        resume: Snapshot | None = None, stop: GracefulStop | None = None,
        scaler: torch.amp.GradScaler | None = None, run_meta: dict | None = None,
        on_eval: Callable[[dict], bool] | None = None, parallel: Parallel | None = None) -> FitResult:
    """Train until the budget, early stopping, a signal or persistent faults end it; leave the best
    weights in `model`. `on_eval(entry)` sees every periodic evaluation; returning True stops the
    run as "pruned" (hyperparameter search). `parallel`: one of several processes under torchrun,
    `forward` then the wrapped model (DDP) and `task` reading this rank's share of each step."""
    trainer = Trainer(model, forward, task, optimizer, cfg, budget, runtime, log, checkpoints, scaler, run_meta,
                      parallel)
    trainer.start(resume)

    def requested() -> bool:
        return stop is not None and stop.requested

    decide = (Decisions(cfg, budget, task) if parallel is None
              else AgreedDecisions(cfg, budget, task, parallel, requested))
    stop_reason = None
    while stop_reason is None:
        now = decide.before_step(trainer.state, requested())
        if now.stop:
            stop_reason = now.stop
            break
        stop_reason = trainer.train_step(now.lr, now.progress)
        if stop_reason:
            break
        now = decide.after_step(trainer.state)
        if now.evaluate:
            stop_reason = trainer.evaluate_during_training(now.progress, on_eval)
        if now.save and stop_reason is None:
            stop_reason = trainer.settle() or trainer.save_checkpoint()
    return trainer.finish(stop_reason)


@dataclass
class Decision:
    stop: str | None = None     # why the run ends before this step, if it does
    lr: float = 0.0
    progress: float = 0.0
    evaluate: bool = False
    save: bool = False


class Decisions:
    """Everything the loop decides at a step, computed in one place from the budget's clock: the
    learning rate and whether to stop, evaluate or save. Under several processes one of them computes
    it and the others follow, so no process leaves a collective the others still wait in."""

    def __init__(self, cfg: FitConfig, budget: Budget, task: Task):
        self.cfg, self.budget, self.task = cfg, budget, task

    def reserve_s(self, st: LoopState) -> float:
        """Time kept back for the final evaluations on all validation batches, one periodic one, and saving."""
        return (st.eval_s_per_batch * (self.cfg.reserve_evals * self.task.eval_batch_count() + (st.eval_batches or 0))
                + self.cfg.after_s)

    def before_step(self, st: LoopState, stop_requested: bool) -> Decision:
        reserve = self.reserve_s(st)
        ended = self.budget.exhausted(st.step, st.seen, next_step_s=st.step_s or 0.0, reserve_s=reserve)
        if ended == "budget" and st.step == 0:
            raise UserError(f"the budget of {self.budget.seconds:g}s ran out before the first training step "
                            f"({self.budget.elapsed():.1f}s went to setup and the first evaluation); give a larger --budget")
        if ended or stop_requested:
            return Decision(stop=ended or "interrupted")
        progress = self.budget.progress(st.step, st.seen, reserve_s=reserve, clock=self.cfg.schedule_clock,
                                        step_s=st.step_s)
        lr = self.cfg.lr * self.cfg.schedule.factor(progress, st.step) * st.lr_scale
        return Decision(lr=lr, progress=progress)

    def after_step(self, st: LoopState) -> Decision:
        now = self.budget.elapsed()
        return Decision(progress=self.budget.progress(st.step, st.seen, reserve_s=self.reserve_s(st),
                                                      clock=self.cfg.schedule_clock, step_s=st.step_s),
                        evaluate=_due(self.cfg.eval_every, st.step - st.last_eval_step, now - st.last_eval_time),
                        save=_due(self.cfg.save_every, st.step - st.last_save_step, now - st.last_save_time))


STOP_REASONS = ("max_steps", "max_tokens", "budget", "interrupted")


class AgreedDecisions(Decisions):
    """Decisions under several processes: rank 0 decides and broadcasts a few numbers, the others
    follow, so every rank stops, evaluates and saves at the same step with the same learning rate.
    After a step with neither evaluation nor save, rank 0 decides the next step's start at once, in
    the same broadcast: one small broadcast per step."""

    def __init__(self, cfg: FitConfig, budget: Budget, task: Task, parallel: Parallel,
                 stop_requested: Callable[[], bool]):
        super().__init__(cfg, budget, task)
        self.parallel, self.stop_requested = parallel, stop_requested
        self.next: Decision | None = None  # the next step's start, decided with the last step's end

    def before_step(self, st: LoopState, stop_requested: bool) -> Decision:
        if self.next is not None:
            d, self.next = self.next, None
            return d
        d = super().before_step(st, stop_requested) if self.parallel.main else Decision()
        return _start(self.parallel.agree(_start_numbers(d)))

    def after_step(self, st: LoopState) -> Decision:
        d, ahead = Decision(), None
        if self.parallel.main:
            d = super().after_step(st)
            if not (d.evaluate or d.save):  # nothing changes the state before the next step starts
                ahead = super().before_step(st, self.stop_requested())
        numbers = self.parallel.agree([d.progress, d.evaluate, d.save, ahead is not None,
                                       *_start_numbers(ahead or Decision())])
        if numbers[3]:
            self.next = _start(numbers[4:])
        return Decision(progress=numbers[0], evaluate=bool(numbers[1]), save=bool(numbers[2]))


def _start_numbers(d: Decision) -> list[float]:
    return [STOP_REASONS.index(d.stop) if d.stop else -1, d.lr, d.progress]


def _start(numbers: list[float]) -> Decision:
    stop, lr, progress = numbers
    return Decision(stop=STOP_REASONS[int(stop)] if stop >= 0 else None, lr=lr, progress=progress)


def _due(every: Every | None, steps_since: int, seconds_since: float) -> bool:
    if every is None:
        return False
    return steps_since >= every.steps if every.steps else seconds_since >= every.seconds


class Trainer:
    """The loop's hands: one optimizer step, evaluation and keeping the best weights, checkpoints,
    rollbacks after repeated faults, and the accounting and logging of each step."""

    def __init__(self, model: nn.Module, forward: Callable, task: Task, optimizer: torch.optim.Optimizer,
                 cfg: FitConfig, budget: Budget, runtime: Runtime, log: RunLog, checkpoints: Checkpoints | None,
                 scaler: torch.amp.GradScaler | None, run_meta: dict | None, parallel: Parallel | None = None):
        self.parallel = parallel
        self.model, self.forward, self.task, self.optimizer, self.cfg = model, forward, task, optimizer, cfg
        self.budget, self.runtime, self.log, self.checkpoints, self.scaler = budget, runtime, log, checkpoints, scaler
        self.run_meta = run_meta or {}
        self.state = LoopState(micro_steps=cfg.micro_steps)
        self.averaged = moving_average(model, cfg.ema, cfg.ema_every) if cfg.ema else None
        self.evaluated = self.averaged.module if self.averaged is not None else model
        self.sign = 1.0 if cfg.stopping.mode == "min" else -1.0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.last_checkpoint: str | None = None
        self.pending: StepOutcome | None = None   # the last step, read once the next one is queued
        self.session_steps = 0
        self.eval_timed: tuple[float, int] | None = None  # (seconds, batches) of the evaluations after the first
        self.recent_loss, self.recent_units, self.last_log = 0.0, 0, -math.inf

    def start(self, resume: Snapshot | None) -> None:
        """Restore a checkpoint, size the periodic evaluation and score the starting weights."""
        if resume is not None:
            self._restore(resume)
        st = self.state
        if st.eval_batches is None:
            st.eval_batches = self.cfg.eval_batches
        if st.eval_batches is None:  # from the time of two batches, after one to warm up or compile
            st.eval_batches = self.task.eval_batch_count()
            if self.budget.seconds:
                self.evaluate(1)
                self.evaluate(2)
                affordable = int(self.cfg.eval_share * self.budget.seconds / max(st.eval_s_per_batch, 1e-6))
                st.eval_batches = max(1, min(self.task.eval_batch_count(), affordable))
                if self.parallel is not None:  # every rank must run as many evaluation batches
                    st.eval_batches = int(self.parallel.agree([st.eval_batches])[0])
        if not st.evals:
            self.record_eval(self.evaluate(st.eval_batches))
        self.model.train()

    def _restore(self, resume: Snapshot) -> None:
        self.state = LoopState.from_json(resume.meta["loop"])
        self.state.micro_steps = self.state.micro_steps or resume.meta.get("micro_steps") or self.cfg.micro_steps
        if resume.meta.get("world_size", 1) != (self.parallel.world if self.parallel is not None else 1):
            # each process's share of a step changed; processes never shrink it after running out of memory
            self.state.micro_steps = self.cfg.micro_steps
        halvings = self.state.micro_steps // self.cfg.micro_steps  # left by out-of-memory retries before the stop
        while halvings > 1 and self.task.halve_micro_batch():
            halvings //= 2
        has_average = resume.meta.get("has_averaged", False) if resume.sharded else resume.averaged is not None
        if self.averaged is not None and not has_average:
            raise UserError(f"checkpoint {resume.path} holds no moving average of the weights; resume with the "
                            "run's own settings (--ema 0: the raw weights) or start a new --out")
        if resume.sharded:
            self.best_state = load_sharded(resume.path, self.model, self.optimizer, resume.meta.get("has_best", False),
                                           self.averaged)
        else:
            if self.parallel is not None and self.parallel.strategy == "fsdp":
                raise UserError(f"checkpoint {resume.path} was written by one process; resume it with --strategy ddp "
                                "or without torchrun")
            self.model.load_state_dict(resume.model)
            self.optimizer.load_state_dict(resume.optimizer)
            self.best_state = resume.best
            if self.averaged is not None:
                self.averaged.load_state_dict(resume.averaged)
        self.cfg.schedule.load_state_dict(resume.meta.get("schedule", {}))
        if self.scaler is not None and resume.meta.get("scaler"):
            self.scaler.load_state_dict(resume.meta["scaler"])
        resume.restore_rng()
        self.last_checkpoint = str(resume.path)

    def train_step(self, lr: float, progress: float) -> str | None:
        """One optimizer step at `lr` (after out of memory: retried with half the micro-batch). The
        previous step is accounted for once this one is queued, so a GPU never waits for the host.
        Returns "diverged" when faults persist after every rollback."""
        st = self.state
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        started = time.monotonic()
        if self.parallel is not None:
            self.parallel.lag()
        while True:
            try:
                outcome = _train_step(self.model, self.forward, self.task, self.optimizer, self.cfg, self.runtime,
                                      st.step, st.micro_steps, self.scaler, self.parallel)
                break
            except (RuntimeError, torch.OutOfMemoryError) as e:
                if self.parallel is not None and is_out_of_memory(e):
                    # a retry on one rank would leave the others in a collective: torchrun ends them all
                    raise UserError("out of memory on one of the processes; give a smaller --micro-batch") from None
                if is_out_of_memory(e):
                    self.optimizer.zero_grad(set_to_none=True)  # the partial gradients hold memory too
                _shrink_after_oom(e, self.runtime.device, getattr(self.task, "halve_micro_batch", None),
                                  "out of memory even at the smallest micro-batch; use a smaller model, --context "
                                  "or --micro-batch")
                st.micro_steps *= 2
                self.log.message(f"warning: out of memory; retrying with micro-batch {self.task.micro_batch} × "
                                 f"{st.micro_steps}")
        st.step += 1
        st.seen += outcome.consumed
        outcome.step, outcome.seen, outcome.progress, outcome.lr = st.step, st.seen, progress, lr
        if self.averaged is not None and st.step % self.cfg.ema_every == 0:
            self.averaged.update_parameters(self.model)  # a skipped step left the weights as they were
        previous, self.pending = self.pending, outcome
        if previous is not None:
            previous.read()
        duration = time.monotonic() - started
        st.train_s += duration
        self.session_steps += 1
        if self.session_steps > WARMUP_STEPS:
            st.steady_seen += outcome.consumed
            st.steady_s += duration
        warm = st.step_s is not None and self.session_steps > WARMUP_STEPS
        st.step_s = 0.8 * st.step_s + 0.2 * duration if warm else duration
        return self.account(previous) if previous is not None else None

    def evaluate(self, max_batches: int | None) -> dict:
        self.evaluated.eval()
        start = time.monotonic()
        while True:
            try:
                with torch.no_grad(), self.runtime.autocast():
                    # eager: a compiled graph would cost a second compile
                    metrics = self.task.evaluate(self.evaluated, max_batches)
                break
            except (RuntimeError, torch.OutOfMemoryError) as e:
                _shrink_after_oom(e, self.runtime.device, getattr(self.task, "halve_eval_batch", None),
                                  "out of memory while evaluating even one sequence at a time; use a smaller model "
                                  "or --context")
                self.log.message("warning: out of memory while evaluating; retrying with half the sequences per pass")
        n = max(max_batches or self.task.eval_batch_count(), 1)
        # the speed over this session's evaluations after its first (warm-up): steadier than the last small sample
        seconds = time.monotonic() - start
        if self.eval_timed is None:
            self.eval_timed = (0.0, 0)
            self.state.eval_s_per_batch = seconds / n
        else:
            self.eval_timed = (self.eval_timed[0] + seconds, self.eval_timed[1] + n)
            self.state.eval_s_per_batch = self.eval_timed[0] / self.eval_timed[1]
        self.model.train()
        return metrics

    def evaluate_during_training(self, progress: float, on_eval: Callable[[dict], bool] | None) -> str | None:
        """A periodic evaluation: logged, the weights kept if best. Returns why the run stops, if it does."""
        diverged = self.settle()
        if diverged:
            return diverged
        metrics = self.evaluate(self.state.eval_batches)
        early = self.record_eval(metrics)
        if hasattr(self.cfg.schedule, "observe"):
            self.cfg.schedule.observe(self.sign * metrics[self.cfg.stopping.metric])
        self.log.show(progress, loss=None, val=_val_text(metrics), rate=self.state.seen / self.state.train_s,
                      unit=self.task.unit, left_s=self.budget.remaining(), force=True)
        if early:
            return "early_stop"
        if on_eval is not None and on_eval(self.state.evals[-1]):
            return "pruned"
        return None

    def record_eval(self, metrics: dict) -> bool:
        """Log an evaluation and keep the weights if they are the best so far. True: stop early."""
        st, rule = self.state, self.cfg.stopping
        value = self.sign * metrics[rule.metric]
        entry = {"step": st.step, self.task.unit: st.seen, "elapsed_s": self.budget.elapsed(), **metrics}
        st.evals.append(entry)
        st.last_eval_step, st.last_eval_time = st.step, self.budget.elapsed()
        self.log.record(kind="eval", **entry)
        verdict = judge(value, st.best_value, noise=metrics.get(f"{rule.metric}_se", 0.0), min_delta=rule.min_delta)
        if verdict is Verdict.WORSE:
            st.bad_evals += 1
        else:  # on a change within the noise the newer weights are kept, the best figure stays the reference
            if verdict is Verdict.BETTER:
                st.best_value, st.bad_evals = value, 0
            st.best_metrics = dict(entry)
            self.best_state = {k: v.detach().clone() for k, v in self.evaluated.state_dict().items()}
        return rule.patience > 0 and st.bad_evals >= rule.patience

    def save_checkpoint(self) -> None:
        if self.checkpoints is None:
            return
        st = self.state
        meta = {"loop": st.to_json(), "schedule": self.cfg.schedule.state_dict(), "spent_s": self.budget.elapsed(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None, **self.run_meta}
        if self.parallel is not None:
            self.last_checkpoint = str(save_sharded(self.checkpoints, self.parallel, st.step, self.model,
                                                    self.optimizer, self.best_state, meta, self.averaged))
            st.last_save_step, st.last_save_time = st.step, self.budget.elapsed()
            return
        self.last_checkpoint = str(self.checkpoints.save(
            st.step, model=self.model.state_dict(), best=self.best_state, optimizer=self.optimizer.state_dict(),
            meta=meta, averaged=self.averaged.state_dict() if self.averaged is not None else None))
        st.last_save_step, st.last_save_time = st.step, self.budget.elapsed()

    def roll_back(self) -> None:
        """After repeated faults: weights and optimizer state back to the last checkpoint (or the
        best weights), the learning rate halved, and the data going on past the batches that failed
        (as PaLM does after a loss spike), since replaying them could fail again."""
        st = self.state
        path = self.checkpoints.latest_valid() if self.checkpoints is not None else None
        if path is not None and is_sharded(path):
            load_sharded(path, self.model, self.optimizer, has_best=False)
        elif path is not None:
            snap = load_snapshot(path)
            self.model.load_state_dict(snap.model)
            self.optimizer.load_state_dict(snap.optimizer)
        elif self.best_state is not None:
            self.model.load_state_dict(self.best_state)
            self.optimizer.state.clear()
        st.lr_scale *= 0.5
        st.rollbacks += 1
        st.consecutive_faults = 0
        self.log.message(f"warning: {FAULTS_BEFORE_ROLLBACK} non-finite steps in a row; weights rolled back to "
                         f"{path.name if path else 'the best so far'}, learning rate halved, data continues at step "
                         f"{st.step}")
        self.log.record(kind="rollback", step=st.step, elapsed_s=self.budget.elapsed(), lr_scale=st.lr_scale,
                        restored=str(path) if path else "best")

    def account(self, outcome: StepOutcome) -> str | None:
        """Count a finished step: a fault (and after repeated faults a rollback) or its loss, and log
        it. Returns "diverged" when faults persist after every rollback."""
        st = self.state
        loss, grad_norm = outcome.read()
        if not (math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))):
            st.skipped_steps += 1
            st.consecutive_faults += 1
            self.log.record(kind="fault", step=outcome.step, elapsed_s=self.budget.elapsed(), loss=_json_number(loss),
                            grad_norm=_json_number(grad_norm), skipped_steps=st.skipped_steps)
            if st.consecutive_faults >= FAULTS_BEFORE_ROLLBACK:
                if st.rollbacks >= MAX_ROLLBACKS:
                    self.log.message(f"error: training keeps producing non-finite values after {MAX_ROLLBACKS} "
                                     "rollbacks with a halved learning rate; stopping and keeping the best weights. "
                                     "Try a lower --lr, --precision fp32 or a smaller --grad-clip.")
                    return "diverged"
                self.roll_back()
            return None
        st.consecutive_faults = 0
        self.recent_loss += loss
        self.recent_units += outcome.units
        now = self.budget.elapsed()
        if now - self.last_log >= self.cfg.log_every_s or outcome.step == 1:
            unit = self.task.unit
            train_loss = self.recent_loss / max(self.recent_units, 1)
            rate = st.seen / st.train_s
            self.log.record(kind="train", step=outcome.step, **{unit: outcome.seen}, elapsed_s=now, lr=outcome.lr,
                            train_loss=train_loss, **{f"{unit}_per_s": rate}, grad_norm=_json_number(grad_norm),
                            skipped_steps=st.skipped_steps)
            self.log.show(outcome.progress, loss=train_loss, val=_val_text(st.evals[-1]), rate=rate, unit=unit,
                          left_s=self.budget.remaining())
            self.last_log, self.recent_loss, self.recent_units = now, 0.0, 0
        return None

    def settle(self) -> str | None:
        """Account for the step still in flight, if any (before evaluating, saving or stopping)."""
        if self.pending is None:
            return None
        outcome, self.pending = self.pending, None
        started = time.monotonic()
        outcome.read()
        self.state.train_s += time.monotonic() - started  # the wait is the rest of that step's time
        return self.account(outcome)

    def finish(self, stop_reason: str) -> FitResult:
        """After the last step: a last evaluation and checkpoint, the best weights back in the model,
        and the final evaluation on all validation batches."""
        st, cfg = self.state, self.cfg
        if stop_reason != "diverged" and self.settle() == "diverged":
            stop_reason = "diverged"
        if stop_reason == "interrupted":
            self.save_checkpoint()
        elif st.last_eval_step != st.step:  # the last weights, unless just evaluated
            self.record_eval(self.evaluate(st.eval_batches))
        if stop_reason != "interrupted" and self.checkpoints is not None and cfg.save_every:
            self.save_checkpoint()
        self.model.load_state_dict(self.best_state)
        if stop_reason != "interrupted" and st.eval_batches < self.task.eval_batch_count() and cfg.final_eval:
            final = self.evaluate(None)
        else:
            final = {k: v for k, v in st.best_metrics.items() if k.startswith("val_")}
        if cfg.final_eval and stop_reason != "interrupted":
            self.log.record(kind="final", step=st.step, **{self.task.unit: st.seen}, elapsed_s=self.budget.elapsed(),
                            best_step=st.best_metrics.get("step"), **{**final, "val_full": True})
        self.log.close()
        return FitResult(stop_reason=stop_reason, state=st, best=st.best_metrics, final=final,
                         checkpoint=self.last_checkpoint)


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


def _train_step(model, forward, task, optimizer, cfg: FitConfig, runtime: Runtime, step: int, micro_steps: int,
                scaler: torch.amp.GradScaler | None, parallel: Parallel | None = None) -> StepOutcome:
    """One optimizer step, queued without waiting for the device where the optimizer allows it; the
    update is skipped when the loss or gradient is not finite. Under several processes each reads
    its share of the step's batches (of one size on every rank), and the loss is divided by the units
    of the whole step times the ranks, which the gradient averaging divides out again: the gradient
    of one process reading them all."""
    batches = [task.batch(step, m) for m in range(micro_steps)]
    world = parallel.world if parallel is not None else 1
    units = sum(task.count(b) for b in batches) * world
    consumed = sum(task.consumed(b) for b in batches) * world
    step_loss = torch.zeros((), device=runtime.device)
    if cfg.l1 > 0:
        # added once per step, so its weight does not depend on the number of micro-batches
        penalty = cfg.l1 * sum(p.abs().sum() for p in model.parameters() if p.dim() >= 2 and p.requires_grad)
        (scaler.scale(penalty) if scaler is not None else penalty).backward()
    for i, b in enumerate(batches):
        b = tuple(to_device(t, runtime.device) for t in b)
        with parallel.accumulating(forward, last=i == len(batches) - 1) if parallel else contextlib.nullcontext():
            with runtime.autocast():
                loss_sum = task.loss(forward, b)
            scaled = loss_sum * world / units
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        step_loss += loss_sum.detach().float()
    if parallel is not None:  # the step's whole loss on every rank, so all see the same non-finite values
        step_loss = parallel.all_sum(step_loss)
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = clip_gradients(model.parameters(), max_norm, parallel)
    if scaler is not None:
        # the scaler skips steps with inf/nan gradients itself and lowers its scale
        scaler.step(optimizer)
        scaler.update()
        grad_norm = None
    elif decides_on_device(optimizer, runtime.device) and not (parallel and parallel.strategy == "fsdp"):
        optimizer.found_inf = (~(torch.isfinite(step_loss) & torch.isfinite(grad_norm))).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif math.isfinite(float(step_loss)) and math.isfinite(float(grad_norm)):  # the others decide on the host
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(units, consumed, step_loss, grad_norm)


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
