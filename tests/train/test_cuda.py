"""The CUDA paths: steps that never make the host wait for the GPU, skips decided on the device, and
pretraining end to end with torch.compile and both half precisions. Skipped where no GPU is visible."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from budgetlm.cli import main
from budgetlm.models.gpt import GPT
from budgetlm.models.config import ModelConfig
from budgetlm.train.lm import LanguageModelTask
from budgetlm.train.loop import FitConfig, _train_step, moving_average
from budgetlm.train.optim import build_optimizer
from budgetlm.train.runtime import Runtime
from budgetlm.train.schedule import Schedule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
TEXT = "\n".join(p.read_text(encoding="utf-8") for p in sorted((Path(__file__).parents[2] / "docs").glob("*.md")))


class PoisonedLM(LanguageModelTask):
    """Language modelling on random tokens whose loss is NaN at `poison_step`."""
    poison_step = -1

    def batch(self, step, micro):
        self.step = step
        return super().batch(step, micro)

    def loss(self, forward, batch):
        loss = super().loss(forward, batch)
        return loss * float("nan") if self.step == self.poison_step else loss


def lm_task(poison_step: int = -1) -> PoisonedLM:
    tokens = np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint16)
    task = PoisonedLM(tokens[:18_000], tokens[18_000:], 2_000, context=64, micro_batch=8, device=CUDA)
    task.poison_step = poison_step
    return task


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_step_never_waits_for_the_gpu(optimizer, precision):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=256, context=64, n_layer=2, n_head=2, d_model=64)).to(CUDA)
    opt = build_optimizer(model, optimizer, lr=1e-3, weight_decay=0.1, device=CUDA)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    cfg = FitConfig(lr=1e-3, schedule=Schedule("constant", warmup=0), micro_steps=2)
    runtime, task = Runtime(CUDA, precision, False), lm_task()
    average = moving_average(model, 0.99)
    for step in range(2):  # lazy initialisation (optimizer state, cuBLAS) may synchronise once
        _train_step(model, model, task, opt, cfg, runtime, step, cfg.micro_steps, scaler)
        average.update_parameters(model)
    before = [p.detach().clone() for p in model.parameters()]
    torch.cuda.set_sync_debug_mode("error")  # raises at any operation that makes the host wait
    try:
        outcomes = [_train_step(model, model, task, opt, cfg, runtime, step, cfg.micro_steps, scaler) for step in range(2, 6)]
        average.update_parameters(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(np.isfinite(o.read()[0]) for o in outcomes)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the steps trained


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_non_finite_step_is_skipped_on_the_gpu(optimizer):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=256, context=64, n_layer=2, n_head=2, d_model=64)).to(CUDA)
    opt = build_optimizer(model, optimizer, lr=1e-3, weight_decay=0.1, device=CUDA)
    cfg = FitConfig(lr=1e-3, schedule=Schedule("constant", warmup=0))
    runtime, task = Runtime(CUDA, "bf16", False), lm_task(poison_step=2)
    weights = []
    for step in range(4):
        weights.append([p.detach().clone() for p in model.parameters()])
        outcome = _train_step(model, model, task, opt, cfg, runtime, step, cfg.micro_steps, None)
        assert np.isfinite(outcome.read()[0]) == (step != 2)
    after = [p.detach() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights[2], weights[3]))  # the poisoned step changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(weights[3], after))
    assert all(torch.isfinite(p).all() for p in after)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pretraining_compiles_and_trains_on_the_gpu(tmp_path, precision):
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(out), "--n-layer", "2", "--d-model", "64",
                 "--n-head", "2", "--context", "64", "--micro-batch", "8", "--vocab-size", "512", "--max-steps", "60",
                 "--precision", precision, "--ema", "0.9", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == torch.cuda.get_device_name() and summary["precision"] == precision and summary["compiled"]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert summary["steps"] == 60 and summary["best_val_loss"] < evals[0]["val_loss"] - 1.0
