import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from budgetlm.eval.calibration import calibrate, fit_inverse_temperature
from budgetlm.models.gpt import GPT
from budgetlm.models.config import ModelConfig
from budgetlm.train.lm import evaluate_lm

CONFIG = ModelConfig(vocab_size=64, context=16, n_layer=1, n_head=2, d_model=32)


@pytest.mark.parametrize("true_temperature", [0.7, 1.6])
def test_the_fit_recovers_the_temperature_the_targets_were_drawn_at(true_temperature):
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    hidden = torch.randn(20000, 32) * 3
    with torch.no_grad():
        probs = torch.softmax(model.logits(hidden) / true_temperature, dim=-1)
        targets = torch.multinomial(probs, 1).squeeze(1)
        beta, curvature = fit_inverse_temperature(model, hidden, targets)
    assert 1 / beta == pytest.approx(true_temperature, rel=0.03)
    assert curvature > 0


def test_an_overconfident_model_is_calibrated_on_held_out_positions_only():
    """Uniform random tokens: a random model's peaked logits are overconfident, so the fit raises the
    temperature; the reported figure scores each half at the other half's temperature."""
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    with torch.no_grad():
        model.embed.weight.mul_(40)  # peaked logits
    tokens = np.random.default_rng(0).integers(0, 64, 16 * 40 + 1)
    n_bytes = 3000
    with torch.no_grad():
        raw = evaluate_lm(model, tokens, n_bytes, 16, 4, torch.device("cpu"))
        result = calibrate(model, tokens, n_bytes, 16, 4, torch.device("cpu"))
        assert model.config.temperature == 1.0  # unchanged by the fit
        assert result.raw_val_bpb == pytest.approx(raw["val_bpb"], rel=1e-6)
        assert result.temperature > 2 and all(t > 2 for t in result.half_temperatures)
        assert result.val_bpb < result.raw_val_bpb - 0.5
        assert result.val_loss == pytest.approx(result.val_bpb * n_bytes * math.log(2) / (len(tokens) - 1))
        # fitted on the positions it is scored on, the temperature does at least as well as cross-fitted
        model.config.temperature = result.temperature
        in_sample = evaluate_lm(model, tokens, n_bytes, 16, 4, torch.device("cpu"))
    assert in_sample["val_bpb"] <= result.val_bpb + 1e-6


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_the_temperature_divides_the_logits_in_every_path(softcap):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, context=16, n_layer=1, n_head=2, d_model=32, logit_softcap=softcap)
    model = GPT(config)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        plain = model(x)
    model.config.temperature = 1.25
    with torch.no_grad():
        tempered = model(x)
        evaluated = model(x, y)
    assert torch.allclose(tempered, plain / 1.25, atol=1e-5)
    expected = F.cross_entropy((plain / 1.25).flatten(0, 1), y.flatten())
    assert evaluated.item() == pytest.approx(expected.item(), rel=1e-5)
    trained = model(x, y)  # with gradients: the block-wise loss where there is no softcap
    assert trained.item() == pytest.approx(expected.item(), rel=1e-5)
