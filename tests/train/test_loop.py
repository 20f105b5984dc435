"""The loop's own behaviour on a tiny regression task: accumulation, faults, out-of-memory, limits."""

import json
import math

import pytest
import torch
from torch import nn

from budgetlm.budget import Budget, EarlyStop, Every
from budgetlm.errors import UserError
from budgetlm.train.loop import FitConfig, fit
from budgetlm.train.metrics import RunLog
from budgetlm.train.optim import build_optimizer
from budgetlm.train.resume import Checkpoints, load_snapshot
from budgetlm.train.runtime import Runtime
from budgetlm.train.schedule import Schedule

CPU = torch.device("cpu")


class Regression:
    """y = x·w* with a 2-layer net; batches are a pure function of (step, micro)."""
    unit = "examples"

    def __init__(self, micro_batch=8, poison_steps=(), oom_steps=(), eval_fits=64):
        self.micro_batch, self.micro_steps = micro_batch, 1
        self.eval_micro_batch, self.eval_fits = 64, eval_fits
        self.poison_steps, self.oom_steps = set(poison_steps), set(oom_steps)
        self.w = torch.randn(6, 1, generator=torch.Generator().manual_seed(0))
        val = torch.Generator().manual_seed(99)
        self.val_x = torch.randn(64, 6, generator=val)

    def batch(self, step, micro):
        g = torch.Generator().manual_seed(step * 1000 + micro)
        x = torch.randn(self.micro_batch, 6, generator=g)
        return x, x @ self.w, torch.tensor(step)

    def count(self, batch):
        return batch[0].shape[0]

    consumed = count

    def loss(self, forward, batch):
        x, y, step = batch
        if int(step) in self.oom_steps:
            self.oom_steps.discard(int(step))
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        loss = ((forward(x) - y) ** 2).sum()
        return loss * float("nan") if int(step) in self.poison_steps else loss

    def halve_micro_batch(self):
        if self.micro_batch < 2:
            return False
        self.micro_batch //= 2
        return True

    def eval_batch_count(self):
        return 2

    def halve_eval_batch(self):
        if self.eval_micro_batch < 2:
            return False
        self.eval_micro_batch //= 2
        return True

    def evaluate(self, forward, max_batches):
        if self.eval_micro_batch > self.eval_fits:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        with torch.no_grad():
            loss = ((forward(self.val_x) - self.val_x @ self.w) ** 2).mean().item()
        return {"val_loss": loss}


def make(task_kwargs=None, **cfg_kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    task = Regression(**(task_kwargs or {}))
    opt = build_optimizer(model, "adamw", lr=1e-2, weight_decay=0.0, device=CPU)
    cfg = FitConfig(lr=1e-2, schedule=Schedule("constant", warmup=0), **{"eval_every": Every(steps=5), **cfg_kwargs})
    return model, task, opt, cfg


def run(model, task, opt, cfg, budget, **kw):
    return fit(model, model, task, opt, cfg, budget, Runtime(CPU, "fp32", False), RunLog(None, quiet=True), **kw)


def test_learns_and_counts():
    model, task, opt, cfg = make()
    result = run(model, task, opt, cfg, Budget(max_steps=60))
    assert result.stop_reason == "max_steps" and result.steps == 60 and result.seen == 60 * 8
    assert result.final["val_loss"] < result.state.evals[0]["val_loss"] / 5


class Slices(Regression):
    """Micro-batch `micro` is a slice of the same batch of 8 examples, whatever the micro-batch size."""

    def batch(self, step, micro):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 6, generator=g)
        y, s = x @ self.w, torch.tensor(step)
        part = slice(micro * self.micro_batch, (micro + 1) * self.micro_batch)
        return x[part], y[part], s


def test_accumulation_equals_the_big_batch():
    """4 micro-batches of 2 give the same update as 1 batch of 8."""
    params = []
    for micro_batch, micro_steps in ((8, 1), (2, 4)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        opt = build_optimizer(model, "adamw", lr=0.1, weight_decay=0.0, device=CPU)
        cfg = FitConfig(lr=0.1, schedule=Schedule("constant", warmup=0), micro_steps=micro_steps, grad_clip=0,
                        eval_every=Every(steps=100))
        run(model, Slices(micro_batch=micro_batch), opt, cfg, Budget(max_steps=3))
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(params[0], params[1], atol=1e-6)
    untrained = torch.cat([p.detach().flatten() for p in make()[0].parameters()])
    assert not torch.allclose(params[0], untrained, atol=1e-3)


def test_a_non_finite_step_is_skipped_and_counted():
    model, task, opt, cfg = make({"poison_steps": {3, 7}})
    result = run(model, task, opt, cfg, Budget(max_steps=20))
    assert result.state.skipped_steps == 2
    assert result.state.rollbacks == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_repeated_faults_roll_back_with_half_the_rate(tmp_path):
    model, task, opt, cfg = make({"poison_steps": {12, 13, 14}}, save_every=Every(steps=5))
    result = run(model, task, opt, cfg, Budget(max_steps=30), checkpoints=Checkpoints(tmp_path))
    assert result.state.rollbacks == 1 and result.state.lr_scale == 0.5
    assert result.stop_reason == "max_steps"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_persistent_faults_stop_the_run_and_keep_the_best_weights():
    model, task, opt, cfg = make({"poison_steps": set(range(10, 1000))})
    result = run(model, task, opt, cfg, Budget(max_steps=200))
    assert result.stop_reason == "diverged"
    assert result.state.rollbacks == 3
    assert math.isfinite(result.final["val_loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_out_of_memory_retries_with_half_the_micro_batch():
    model, task, opt, cfg = make({"oom_steps": {2}})
    result = run(model, task, opt, cfg, Budget(max_steps=5))
    assert task.micro_batch == 4 and result.state.micro_steps == 2 and cfg.micro_steps == 1
    assert result.steps == 5


def test_out_of_memory_at_the_smallest_batch_explains():
    model, task, opt, cfg = make({"micro_batch": 1, "oom_steps": {0}})
    with pytest.raises(UserError, match="out of memory"):
        run(model, task, opt, cfg, Budget(max_steps=5))


def test_out_of_memory_while_evaluating_halves_the_evaluation_batch():
    model, task, opt, cfg = make({"eval_fits": 16})
    result = run(model, task, opt, cfg, Budget(max_steps=5))
    assert task.eval_micro_batch == 16 and task.micro_batch == 8
    assert result.steps == 5


def test_out_of_memory_while_evaluating_one_at_a_time_explains():
    model, task, opt, cfg = make({"eval_fits": 0})
    with pytest.raises(UserError, match="out of memory while evaluating"):
        run(model, task, opt, cfg, Budget(max_steps=5))


def test_a_budget_too_small_for_one_step_is_a_clear_error():
    model, task, opt, cfg = make()
    budget = Budget(seconds=0.01)
    with pytest.raises(UserError, match="before the first training step"):
        run(model, task, opt, cfg, budget)


def scripted_evaluations(values: list[dict]):
    """A model, optimizer and task whose successive evaluations return `values` (the last one repeats),
    with a copy of the weights at each evaluation, keyed by its number from 1."""
    class Scripted(Regression):
        def evaluate(self, forward, max_batches):
            calls = len(snapshots) + 1
            snapshots[calls] = [p.detach().clone() for p in model.parameters()]
            return values[min(calls - 1, len(values) - 1)]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = build_optimizer(model, "adamw", lr=1e-2, weight_decay=0.0, device=CPU)
    snapshots: dict[int, list[torch.Tensor]] = {}
    return model, opt, Scripted(), snapshots


def stop_after_two_declines() -> FitConfig:
    return FitConfig(lr=1e-2, schedule=Schedule("constant", warmup=0), eval_every=Every(steps=5),
                     stopping=EarlyStop("val_loss", 2))


def test_early_stopping_restores_the_best_weights():
    model, opt, task, snapshots = scripted_evaluations(
        [{"val_loss": v} for v in [5.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    result = run(model, task, opt, stop_after_two_declines(), Budget(max_steps=100))
    assert result.stop_reason == "early_stop" and result.steps == 15  # evals at 0, 5 (best), 10, 15
    assert result.best["step"] == 5
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), snapshots[2]))


def test_a_change_within_the_noise_neither_counts_against_patience_nor_drops_the_newer_weights():
    model, opt, task, snapshots = scripted_evaluations(
        [{"val_loss": v, "val_loss_se": 0.1} for v in [5.0, 1.0, 1.05, 1.5, 0.98, 1.6, 1.7, 1.8]])
    result = run(model, task, opt, stop_after_two_declines(), Budget(max_steps=100))
    # 1.05 and 0.98 lie within the noise of 1.0: only 1.5 and 1.6 count as declines (without the noise, 1.05 and
    # 1.5 would have stopped the run at step 15, keeping step 5)
    assert result.stop_reason == "early_stop" and result.steps == 25
    assert result.best["step"] == 20  # the newest weights within the noise of the best
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), snapshots[5]))


class Recording(Regression):
    """Records the raw weights after every update (the weights each step starts from, and at the last
    evaluation) and what the evaluation was given."""

    def __init__(self, model, **kw):
        super().__init__(**kw)
        self.model, self.raw = model, []

    def batch(self, step, micro):
        if len(self.raw) == step:
            self.raw.append([p.detach().clone() for p in self.model.parameters()])
        return super().batch(step, micro)

    def evaluate(self, forward, max_batches):
        self.evaluated, self.raw_at_eval = forward, [p.detach().clone() for p in self.model.parameters()]
        return super().evaluate(forward, max_batches)


@pytest.mark.parametrize("every", [1, 4])
def test_the_moving_average_is_what_gets_evaluated_and_kept(every):
    decay, steps = 0.9, 32
    model, _, opt, cfg = make(ema=decay, ema_every=every, eval_every=Every(steps=1000))
    task = Recording(model)
    result = run(model, task, opt, cfg, Budget(max_steps=steps))
    assert result.best["step"] == steps and task.evaluated is not model
    after_step = task.raw[1:] + [task.raw_at_eval]       # raw weights after steps 1 … steps
    averaged = after_step[every - 1 :: every]            # those the average reads, every `every` steps
    expected = averaged[0]                               # the first update copies
    for n in range(1, len(averaged)):
        rate = 1 - min(decay**every, (1 + n) / (10 + n))
        expected = [e + rate * (w - e) for e, w in zip(expected, averaged[n])]
    kept = list(model.parameters())
    assert all(torch.allclose(k, e, atol=1e-6) for k, e in zip(kept, expected))
    assert not all(torch.allclose(k, w, atol=1e-4) for k, w in zip(kept, after_step[-1]))


def test_the_moving_average_resumes_exactly(tmp_path):
    finals = []
    for resumed in (False, True):
        model, task, opt, cfg = make(ema=0.9, eval_every=Every(steps=1000), save_every=Every(steps=5))
        checkpoints = Checkpoints(tmp_path / str(resumed))
        if resumed:
            run(model, task, opt, cfg, Budget(max_steps=5), checkpoints=checkpoints)
            snapshot = load_snapshot(checkpoints.latest_valid())
            assert snapshot.averaged is not None
            model, task, opt, cfg = make(ema=0.9, eval_every=Every(steps=1000), save_every=Every(steps=5))
            run(model, task, opt, cfg, Budget(max_steps=12), checkpoints=checkpoints, resume=snapshot)
        else:
            run(model, task, opt, cfg, Budget(max_steps=12), checkpoints=checkpoints)
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_resuming_a_run_without_an_average_into_one_with_it_is_refused(tmp_path):
    model, task, opt, cfg = make(eval_every=Every(steps=1000), save_every=Every(steps=5))
    checkpoints = Checkpoints(tmp_path)
    run(model, task, opt, cfg, Budget(max_steps=5), checkpoints=checkpoints)
    snapshot = load_snapshot(checkpoints.latest_valid())
    model, task, opt, cfg = make(ema=0.9, eval_every=Every(steps=1000))
    with pytest.raises(UserError, match="no moving average"):
        run(model, task, opt, cfg, Budget(max_steps=8), resume=snapshot)


@pytest.fixture
def device_decides(monkeypatch):
    """The loop as it runs on a GPU: the skip decided on the device, and no tensor read on the host
    while a step is queued (a read would make the host wait for the GPU)."""
    from budgetlm.train import loop

    monkeypatch.setattr(loop, "decides_on_device", lambda optimizer, device: getattr(optimizer, "_step_supports_amp_scaling", False))
    queue_step = loop._train_step

    def no_host_reads(*args, **kwargs):
        def refuse(*_):
            raise AssertionError("a training step read a tensor on the host")

        with pytest.MonkeyPatch.context() as inside:
            for name in ("__float__", "__bool__", "item", "tolist"):
                inside.setattr(torch.Tensor, name, refuse)
            return queue_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", no_host_reads)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_on_a_gpu_a_step_is_skipped_without_a_host_read(device_decides, optimizer):
    model, task, _, cfg = make({"poison_steps": {3, 7}})
    task = Recording(model, poison_steps={3, 7})
    opt = build_optimizer(model, optimizer, lr=1e-2, weight_decay=0.1, device=CPU)
    result = run(model, task, opt, cfg, Budget(max_steps=12))
    assert result.state.skipped_steps == 2 and result.state.rollbacks == 0
    for poisoned in (3, 7):  # the weights after the poisoned step are those before it
        assert all(torch.equal(a, b) for a, b in zip(task.raw[poisoned], task.raw[poisoned + 1]))
    assert not all(torch.equal(a, b) for a, b in zip(task.raw[4], task.raw[5]))
    assert result.final["val_loss"] < result.state.evals[0]["val_loss"]


def test_on_a_gpu_faults_are_counted_a_step_late_but_all_counted(device_decides, tmp_path):
    log_path = tmp_path / "metrics.jsonl"
    model, task, opt, cfg = make({"poison_steps": {12, 13, 14}}, save_every=Every(steps=5))
    result = fit(model, model, task, opt, cfg, Budget(max_steps=30), Runtime(CPU, "fp32", False),
                 RunLog(log_path, quiet=True), checkpoints=Checkpoints(tmp_path / "ck"))
    assert result.state.rollbacks == 1 and result.state.skipped_steps == 3
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "fault"] == [13, 14, 15]  # the loop's count after each
    assert all(torch.isfinite(p).all() for p in model.parameters())
