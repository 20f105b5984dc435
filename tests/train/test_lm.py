import math

import numpy as np
import pytest
import torch

from budgetlm.models.gpt import GPT
from budgetlm.models.config import ModelConfig
from budgetlm.train.lm import evaluate_lm
from tests.conftest import HostReads


def test_evaluation_sums_every_batch_and_reads_the_device_once_per_evaluation():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, context=16, n_layer=1, n_head=2, d_model=32)).eval()
    tokens = np.random.default_rng(0).integers(0, 64, 16 * 40 + 1)
    results, reads = [], []
    for batch in (40, 4):  # one batch, then ten
        with pytest.MonkeyPatch.context() as patch, torch.no_grad():
            counter = HostReads(patch)
            results.append(evaluate_lm(model, tokens, 3000, 16, batch, torch.device("cpu")))
        reads.append(counter.count)
    assert reads[0] == reads[1]
    assert results[1]["val_tokens"] == 640
    assert results[1]["val_loss"] == pytest.approx(results[0]["val_loss"], rel=1e-5)
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens[:-1]).view(40, 16))
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(tokens[1:]).flatten())
    assert results[1]["val_loss"] == pytest.approx(float(expected), rel=1e-4)
    assert results[1]["val_bpb"] == pytest.approx(float(expected) * 640 / (3000 * math.log(2)), rel=1e-4)


def test_a_sampled_evaluation_scores_the_same_windows_in_every_run_and_says_it_is_a_sample():
    from budgetlm.train.lm import LanguageModelTask

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, context=16, n_layer=1, n_head=2, d_model=32)).eval()
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 64, 5000), rng.integers(0, 64, 16 * 100 + 1)
    tasks = [LanguageModelTask(train, val, 4000, 16, 4, torch.device("cpu"), seed=seed) for seed in (0, 1)]
    with torch.no_grad():
        first, second = (task.evaluate(model, 5) for task in tasks)
        whole = tasks[0].evaluate(model, None)
    assert first == second  # runs with other seeds score the same 20 windows
    assert first["val_sample_tokens"] == 20 * 16 and first["val_full"] is False
    assert 0 < first["val_loss_se"] and first["val_bpb_se"] == pytest.approx(
        first["val_loss_se"] * first["val_bpb"] / first["val_loss"])
    assert whole["val_tokens"] == 1600 and whole["val_full"] is True and "val_loss_se" not in whole
    with torch.no_grad():
        assert tasks[0].evaluate(model, 25) == whole  # a sample of every window is the whole stream
