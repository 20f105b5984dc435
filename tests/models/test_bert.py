import torch

from budgetlm.models.bert import BERT
from budgetlm.models.config import ModelConfig
from budgetlm.models.gpt import GPT


def tiny(arch: str, **kw) -> ModelConfig:
    return ModelConfig(arch=arch, vocab_size=97, context=16, n_layer=2, d_model=32, n_head=2, **kw)


def test_an_encoder_reads_both_ways_and_a_decoder_only_back():
    torch.manual_seed(0)
    x = torch.randint(0, 97, (1, 12))
    later = x.clone()
    later[0, 9] = (x[0, 9] + 1) % 97
    bert, gpt = BERT(tiny("bert")).eval(), GPT(tiny("gpt")).eval()
    with torch.no_grad():
        assert not torch.allclose(bert(x)[0, 2], bert(later)[0, 2], atol=1e-5)  # an earlier position sees the change
        assert torch.allclose(gpt(x)[0, 2], gpt(later)[0, 2], atol=1e-6)
        assert torch.allclose(bert(x)[0, 10:], bert(x)[0, 10:])


def test_the_masked_loss_is_the_full_loss_restricted_to_the_masked_positions():
    torch.manual_seed(1)
    model = BERT(tiny("bert")).eval()
    x = torch.randint(0, 97, (3, 16))
    targets = torch.full_like(x, -100)
    picked = torch.rand(x.shape) < 0.3
    targets[picked] = x[picked]
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), targets.flatten(), reduction="none")
        assert torch.allclose(model(x, targets, reduction="sum"), full.sum(), atol=1e-4)
        assert torch.allclose(model(x, targets), full[picked.flatten()].mean(), atol=1e-5)


def test_the_masked_training_loss_takes_the_blockwise_path_with_the_same_value_and_gradients():
    torch.manual_seed(3)
    model = BERT(tiny("bert"))
    x = torch.randint(0, 97, (3, 16))
    targets = torch.where(torch.rand(x.shape) < 0.3, x, -100)
    blockwise = model(x, targets, reduction="sum", label_smoothing=0.1)
    blockwise.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), targets.flatten(), reduction="sum",
                                              label_smoothing=0.1)
    plain.backward()
    assert "LinearCrossEntropy" in str(blockwise.grad_fn)  # the block-wise head (models/loss.py)
    assert torch.allclose(blockwise, plain, rtol=1e-5)
    for a, p in zip(grads, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_padding_keys_are_hidden_from_the_real_tokens():
    torch.manual_seed(2)
    model = BERT(tiny("bert")).eval()
    x = torch.randint(0, 97, (1, 8))
    padded = torch.cat((x, torch.randint(0, 97, (1, 4))), dim=1)
    mask = torch.cat((torch.ones(1, 8), torch.zeros(1, 4)), dim=1)
    with torch.no_grad():
        assert torch.allclose(model.hidden(padded, mask)[:, :8], model.hidden(x), atol=1e-5)
