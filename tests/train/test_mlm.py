import numpy as np
import pytest
import torch

from budgetlm.train.mlm import MaskedLMTask, batch_generator, mask_tokens

MASK_ID = 1000


def test_masking_rate_and_the_80_10_10_split():
    x = torch.randint(10, 900, (64, 256))
    corrupted, targets = mask_tokens(x, 0.25, MASK_ID, 900, batch_generator(0, 0, 0))
    picked = targets != -100
    assert picked.float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert torch.equal(targets[picked], x[picked]) and torch.equal(corrupted[~picked], x[~picked])
    masked = (corrupted[picked] == MASK_ID).float().mean().item()
    kept = (corrupted[picked] == x[picked]).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1 + 0.1 / 890, abs=0.015)  # kept, or replaced by the same token by chance
    assert 1 - masked - kept == pytest.approx(0.1, abs=0.015)
    assert int(corrupted.max()) == MASK_ID and int(corrupted[corrupted != MASK_ID].max()) < 900


def test_masks_are_a_function_of_seed_step_and_micro_batch():
    x = torch.randint(10, 900, (4, 64))
    draw = lambda *key: mask_tokens(x, 0.15, MASK_ID, 900, batch_generator(*key))[1]
    assert torch.equal(draw(3, 7, 1), draw(3, 7, 1))
    assert not torch.equal(draw(3, 7, 1), draw(3, 7, 0))
    assert not torch.equal(draw(3, 7, 1), draw(4, 7, 1))


def test_kept_tokens_are_never_masked_and_every_row_has_a_mask():
    x = torch.zeros(8, 16, dtype=torch.int64)
    x[:, 5] = 7
    _, targets = mask_tokens(x, 0.01, MASK_ID, 900, batch_generator(0, 0, 0), keep=(0,))
    assert torch.equal(targets != -100, x == 7)


def test_the_task_draws_the_same_batch_again_on_resume():
    tokens = np.random.default_rng(0).integers(10, 900, 5000).astype(np.uint16)
    make = lambda: MaskedLMTask(tokens, tokens[:1000], 32, 4, torch.device("cpu"), mask_rate=0.15,
                                mask_id=MASK_ID, random_below=900, seed=5)
    a, b = make().batch(12, 1), make().batch(12, 1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert make().count(a) == int((a[1] != -100).sum()) > 0
    assert make().consumed(a) == 4 * 32  # budgets count the text read, masked or not
