import numpy as np
import pytest
import torch

from budgetlm.train.span import corrupt_batch, corrupt_spans, span_counts

SENTINELS = np.arange(5000, 5100)


def reconstruct(inputs: np.ndarray, targets: np.ndarray) -> list[int]:
    spans, current = {}, None
    for t in targets:
        if t in SENTINELS:
            current = int(t)
            spans[current] = []
        else:
            spans[current].append(int(t))
    out = []
    for t in inputs:
        out += spans[int(t)] if t in SENTINELS else [int(t)]
    return out


@pytest.mark.parametrize("length", [20, 64, 256])
def test_the_input_and_target_together_give_back_the_text(length):
    tokens = np.random.default_rng(length).integers(0, 4000, length)
    inputs, targets = corrupt_spans(tokens, SENTINELS, np.random.default_rng(1))
    assert reconstruct(inputs, targets) == tokens.tolist()
    dropped, spans = span_counts(length)
    assert dropped == round(0.15 * length) and spans == max(1, round(dropped / 3))
    assert list(inputs[np.isin(inputs, SENTINELS)]) == list(SENTINELS[:spans])  # in order, one per span
    assert list(targets[np.isin(targets, SENTINELS)]) == list(SENTINELS[: spans + 1])  # and one more to end
    assert len(inputs) == length - dropped + spans and len(targets) == dropped + spans + 1


def test_mean_span_length_is_about_three():
    lengths = []
    rng = np.random.default_rng(0)
    for _ in range(200):
        _, targets = corrupt_spans(np.arange(256), SENTINELS, rng)
        marks = np.flatnonzero(np.isin(targets, SENTINELS))
        lengths += list(np.diff(marks) - 1)
    assert np.mean(lengths) == pytest.approx(3.0, abs=0.15)


def test_the_decoder_reads_a_start_token_then_the_targets_shifted():
    rows = np.random.default_rng(0).integers(0, 4000, (3, 40))
    src, dec_in, targets = corrupt_batch(rows, SENTINELS, 7, np.random.default_rng(2))
    assert src.shape[0] == dec_in.shape[0] == 3 and dec_in.shape == targets.shape
    assert torch.equal(dec_in[:, 0], torch.full((3,), 7)) and torch.equal(dec_in[:, 1:], targets[:, :-1])
