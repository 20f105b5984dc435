import pytest
import torch
import torch.nn.functional as F

from budgetlm.models import loss
from budgetlm.models.loss import linear_cross_entropy


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_blockwise_loss_and_gradients_equal_the_plain_path(monkeypatch, reduction, smoothing):
    monkeypatch.setattr(loss, "BLOCK_ELEMENTS", 7 * 50)  # blocks of 7 rows: the last one is partial
    torch.manual_seed(0)
    hidden = torch.randn(4, 6, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (4, 6))
    targets[0, :3] = -100  # ignored positions count neither in the sum nor in the mean
    got = linear_cross_entropy(hidden, weight, targets, reduction, smoothing)
    got_grads = torch.autograd.grad(2 * got, (hidden, weight))
    expected = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), reduction=reduction,
                               label_smoothing=smoothing)
    expected_grads = torch.autograd.grad(2 * expected, (hidden, weight))
    assert torch.allclose(got, expected)
    for a, b in zip(got_grads, expected_grads):
        assert torch.allclose(a, b)
    assert not got_grads[0][0, :3].any()  # no gradient from ignored positions


def test_bf16_autocast_tracks_the_fp32_loss():
    torch.manual_seed(0)
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(300, 32, requires_grad=True)
    targets = torch.randint(0, 300, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, targets)
    got.backward()
    assert got.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.float32
    expected = F.cross_entropy(hidden.detach() @ weight.detach().T, targets)
    assert abs(got.item() - expected.item()) < 0.05 * expected.item()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_forward_only_loss_equals_the_plain_path(monkeypatch, reduction, smoothing):
    monkeypatch.setattr(loss, "FORWARD_BLOCK_ELEMENTS", 7 * 50)  # blocks of 7 rows: the last one is partial
    monkeypatch.setattr(loss.LinearCrossEntropy, "forward", None)  # the gradient-forming path must not run
    torch.manual_seed(0)
    hidden = torch.randn(4, 6, 16, dtype=torch.float64)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (4, 6))
    targets[0, :3] = -100
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, targets, reduction, smoothing)
    expected = F.cross_entropy((hidden @ weight.detach().T).flatten(0, 1), targets.flatten(), reduction=reduction,
                               label_smoothing=smoothing)
    assert got.shape == expected.shape and torch.allclose(got, expected)
