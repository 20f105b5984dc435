import contextlib
import copy
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from budgetlm.data.tokens import cache_dir
from budgetlm.models import loss
from budgetlm.models.config import ModelConfig
from budgetlm.models.gpt import GPT
from budgetlm.models.registry import ARCHS
from budgetlm.train import compile as compiling
from budgetlm.train.mlm import MaskedLMTask
from budgetlm.train.runtime import can_compile
from budgetlm.train.span import SpanCorruptionTask

CPU = torch.device("cpu")
# Inductor's cache kept between test runs (only its record is fresh): a cold compile takes 20-50 s here
TEST_CACHE = Path(tempfile.gettempdir()) / "budgetlm-tests-compile"


def config(**changes) -> ModelConfig:
    shape = dict(vocab_size=64, context=16, n_layer=2, n_head=2, d_model=32, dropout=0.0, canon=0)
    return ModelConfig(**{**shape, **changes})


def test_the_compile_cache_lies_in_budgetlms_cache_and_is_keyed_by_shape_and_precision():
    base = compiling.compile_cache(config(), 8, CPU, "bf16")
    assert base.path.is_relative_to(cache_dir() / "compile")
    assert torch.__version__ in str(base.path) and compiling.device_key(CPU) in str(base.path)
    assert compiling.compile_cache(config(), 8, CPU, "bf16") == base
    others = [compiling.compile_cache(config(d_model=64), 8, CPU, "bf16"),
              compiling.compile_cache(config(), 4, CPU, "bf16"),
              compiling.compile_cache(config(), 8, CPU, "fp32"),
              compiling.compile_cache(config(dropout=0.1), 8, CPU, "bf16"),
              compiling.compile_cache(config(arch="bert"), 8, CPU, "bf16")]
    assert len({base.path, *(c.path for c in others)}) == 6


@pytest.fixture
def compiler():
    if can_compile():
        pytest.skip(can_compile())


def test_the_decision_weighs_tokens_gained_against_tokens_lost(compiler):
    cold, warm = compiling.DEFAULT_COMPILE_S["cpu"]["cold"], compiling.DEFAULT_COMPILE_S["cpu"]["warm"]
    short = 2 * cold  # a cold compile would take half of it
    assert compiling.decide("auto", config(), 8, CPU, "bf16", 3600).compile
    decision = compiling.decide("auto", config(), 8, CPU, "bf16", short)
    assert not decision.compile and "eager" in decision.reason and "default" in decision.reason
    assert not compiling.decide("auto", config(), 8, CPU, "bf16", None).compile
    decision.cache.note_compile(cold, warm=False)  # an earlier run compiled this shape: its cache is filled
    decision = compiling.decide("auto", config(), 8, CPU, "bf16", short)
    assert decision.compile and "warm cache" in decision.reason
    assert not compiling.decide("auto", config(), 8, CPU, "bf16", 1.5 * warm).compile
    # the flags win; a shape measured slower compiled is not compiled, whatever the budget
    assert not compiling.decide("off", config(), 8, CPU, "bf16", 3600).compile
    assert all(compiling.decide("on", config(arch=arch), 8, CPU, "bf16", 1).compile for arch in ("gpt", "bert", "t5"))
    decision.cache.note_speed(compiled=False, tokens_per_s=1000)
    decision.cache.note_speed(compiled=True, tokens_per_s=900)
    decision = compiling.decide("auto", config(), 8, CPU, "bf16", 3600)
    assert not decision.compile and "×0.90 (measured" in decision.reason


def test_a_cold_cache_is_filled_where_that_costs_a_little_of_a_run_and_pays_later(compiler):
    speedup, cold = compiling.DEFAULT_SPEEDUP["cpu"], compiling.DEFAULT_COMPILE_S["cpu"]["cold"]
    # tokens compiled ÷ eager = speedup·(budget − cold) ÷ budget: just under 1 here, within INVESTMENT
    budget = speedup * cold / (speedup - 1 + compiling.INVESTMENT / 2)
    assert 1 - compiling.INVESTMENT < compiling.tokens_ratio(budget, cold, speedup) < 1
    decision = compiling.decide("auto", config(), 8, CPU, "bf16", budget)
    assert decision.compile and "fill the cache" in decision.reason


def test_measured_compile_times_are_used_at_other_shapes_of_the_device(compiler):
    compiling.compile_cache(config(d_model=64), 8, CPU, "bf16").note_compile(3.0, warm=False)
    seconds, source = compiling.expected_compile_s(compiling.compile_cache(config(), 8, CPU, "bf16"), CPU)
    assert seconds == 3.0 and "other shapes" in source


def test_the_regionally_compiled_model_trains_as_the_eager_one_with_one_graph_for_all_layers(compiler, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(loss, "BLOCK_ELEMENTS", 12 * 64)  # the loss's 32 rows in blocks of 12, 12 and 8
    torch.manual_seed(0)
    eager = GPT(config(n_layer=3))
    model = copy.deepcopy(eager)
    cache = compiling.CompileCache(TEST_CACHE)
    (cache.path / compiling.RECORD).unlink(missing_ok=True)
    graphs = counters["stats"]["unique_graphs"]
    seconds = compiling.compile_language_model(model, cache, 2, 16, contextlib.nullcontext)
    assert seconds > 0 and cache.record()["compile_s"]["cold"] == [round(seconds, 2)] and cache.is_warm()
    # one graph run by each of the 3 blocks, and the loss's step for a block of rows and for the shorter last one
    assert counters["stats"]["unique_graphs"] == graphs + 3
    assert all(p.grad is None for p in model.parameters())  # the compiling pass leaves no gradients
    x = torch.randint(0, 64, (2, 16))
    for m in (model, eager):
        m(x, x).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name
    assert set(model.state_dict()) == set(eager.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # training steps on new batches and weights compile nothing more
        model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():  # evaluation and a copy (the moving average's) run eagerly, each with its own weights
        average = copy.deepcopy(model)
        for p in average.parameters():
            p.mul_(0.5)
        assert not torch.allclose(model(x), eager(x), atol=1e-3)  # trained
        assert not torch.allclose(average(x), model(x), atol=1e-3)
    assert counters["stats"]["unique_graphs"] == graphs + 3


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_an_encoder_compiles_on_its_own_objectives_batch_and_trains_as_eager_without_recompiling(compiler, arch):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    tokens = np.random.default_rng(0).integers(0, 48, 2000).astype(np.uint16)
    task = (MaskedLMTask(tokens, tokens, 16, 2, CPU, mask_rate=0.25, mask_id=63, random_below=48) if arch == "bert"
            else SpanCorruptionTask(tokens, tokens, 16, 2, CPU, sentinels=np.arange(48, 58), start_id=63))
    eager = ARCHS[arch][0](config(arch=arch))
    model = copy.deepcopy(eager)
    graphs = counters["stats"]["unique_graphs"]
    compiling.compile_training_step(model, compiling.CompileCache(TEST_CACHE), task.batch(0, 0), task.loss,
                                    contextlib.nullcontext)
    # one graph for every block (T5: its encoder's and its decoder's, which reads the encoder's output)
    assert counters["stats"]["unique_graphs"] == graphs + (1 if arch == "bert" else 2)
    assert all(p.grad is None for p in model.parameters())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager)]
    counted = set()
    for step in range(1, 5):  # a BERT's batches mask other numbers of positions: the blocks' shape stays
        batch = task.batch(step, 0)
        counted.add(task.count(batch))
        losses = [task.loss(m, batch) / task.count(batch) for m in (model, eager)]  # per unit, as the loop's
        for value in losses:
            value.backward()
        assert torch.allclose(*losses, rtol=1e-5), step
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):  # (the two drift apart a little)
            assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-3), (step, name)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert len(counted) > 1 or arch == "t5"
    assert counters["stats"]["unique_graphs"] == graphs + (1 if arch == "bert" else 2)


def test_the_compiled_loss_step_gives_the_eager_loss_and_gradients(compiler, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(loss, "BLOCK_ELEMENTS", 7 * 50)  # blocks of 7 rows: the last one shorter
    torch.manual_seed(0)
    hidden = torch.randn(24, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (24,))
    targets[:3] = -100
    results = []
    graphs = counters["stats"]["unique_graphs"]
    for blocks in (loss.block_gradients, compiling.compiled_loss_blocks()):
        value = loss.linear_cross_entropy(hidden, weight, targets, "mean", 0.1, blocks)
        results.append((value, *torch.autograd.grad(value, (hidden, weight))))
    for eager, compiled in zip(*results):
        assert torch.allclose(compiled, eager, atol=1e-6, rtol=1e-5)
    assert not results[1][1][:3].any()  # no gradient from ignored rows
    assert counters["stats"]["unique_graphs"] == graphs + 2  # blocks of 7 rows, and the last of 3
