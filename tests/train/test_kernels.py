"""The runtime's CPU kernels compute what the model's own would: written-out attention, the cheaper dropout."""

import torch
import torch.nn.functional as F
from torch import nn

from budgetlm.models.blocks import Attention, Rotary, attend
from budgetlm.models.gpt import GPT
from budgetlm.models.config import ModelConfig
from budgetlm.train import kernels
from budgetlm.train.kernels import FastCPUDropout, apply_kernels, plain_attention, use_plain_attention


# bf16 on a CPU writes attention out for short sequences; it must agree with sdpa's own kernel, forward and backward
def test_bf16_plain_attention_agrees_with_sdpa(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(64, 2, causal=True)
    apply_kernels(attn, torch.device("cpu"))
    assert attn.kernel is kernels.cpu_attention
    x = torch.randn(2, 40, 64, requires_grad=True)
    rope = Rotary(32, 40).tables(0, 40, torch.bfloat16)
    assert not use_plain_attention(torch.zeros(1), 40)  # fp32: sdpa
    assert use_plain_attention(torch.zeros(1, dtype=torch.bfloat16), 40)
    assert not use_plain_attention(torch.zeros(1, dtype=torch.bfloat16), 300)

    def output_and_input_gradient():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = attn(x, rope=rope)
        (gradient,) = torch.autograd.grad(y.float().square().sum(), x)
        return y, gradient

    plain, plain_grad = output_and_input_gradient()
    monkeypatch.setattr(kernels, "CPU_PLAIN_ATTENTION_MAX_LEN", 0)
    sdpa, sdpa_grad = output_and_input_gradient()
    assert plain.dtype == torch.bfloat16
    assert torch.allclose(plain.float(), sdpa.float(), atol=2e-2)
    assert torch.allclose(plain_grad, sdpa_grad, atol=5e-2, rtol=5e-2)


def test_plain_attention_is_causal_and_drops_out_only_when_asked():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(plain_attention(q, k, v, causal=True), expected, atol=1e-6)
    assert not torch.allclose(plain_attention(q, k, v, causal=False), expected, atol=1e-3)
    assert not torch.allclose(plain_attention(q, k, v, causal=True, dropout_p=0.5), expected, atol=1e-3)


# --- dropout with a mask drawn four elements at a time ------------------------------------------------

def test_cpu_dropout_drops_the_rate_keeps_the_expectation_and_its_gradient_is_the_mask():
    torch.manual_seed(0)
    drop = FastCPUDropout(0.1).train()
    x = torch.ones(400_000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003  # 4 standard errors at 400k draws
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - round(0.1 * 65536) / 65536)))
    assert abs(y.mean().item() - 1.0) < 0.005
    # each of the four 16-bit lanes of a random word drops at the rate: no lane is biased
    lanes = kept.view(-1, 4).float().mean(0)
    assert torch.all((lanes - 0.9).abs() < 0.005), lanes
    # neighbours are dropped independently (two lanes of one word, and two words)
    pairs = kept.view(-1, 2).float()
    assert abs((pairs[:, 0] * pairs[:, 1]).mean().item() - 0.81) < 0.005
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)


def test_cpu_dropout_follows_the_seed_keeps_dtype_and_shape_and_is_identity_in_eval():
    drop = FastCPUDropout(0.25).train()
    x = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    torch.manual_seed(1)
    first = drop(x)
    torch.manual_seed(1)
    assert torch.equal(drop(x), first)
    assert first.dtype == torch.bfloat16 and first.shape == x.shape
    assert not torch.equal(drop(x), first)  # a fresh mask at the next call
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(FastCPUDropout(1.0).train()(x), torch.zeros_like(x))


def test_cpu_dropout_inside_a_compiled_graph_draws_its_own_mask_by_the_seed():
    drop = FastCPUDropout(0.1).train()
    compiled = torch.compile(lambda x: drop(x) * 2, dynamic=False)
    x = torch.ones(40_000, requires_grad=True)
    torch.manual_seed(3)
    y = compiled(x)
    torch.manual_seed(3)
    assert torch.equal(compiled(x), y)  # the mask follows the seed, as eager's does
    torch.manual_seed(3)
    assert torch.equal(drop(x) * 2, y)  # and is the eager mask: the op runs as it is inside the graph
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.006
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)




def test_kernels_are_applied_from_outside_and_only_on_a_cpu():
    model = GPT(ModelConfig(vocab_size=64, context=16, n_layer=2, n_head=2, d_model=32, dropout=0.1))
    assert all(type(m) is nn.Dropout for m in model.modules() if isinstance(m, nn.Dropout))
    assert all(m.kernel is attend for m in model.modules() if isinstance(m, Attention))
    apply_kernels(model, torch.device("meta"))  # any device but a CPU: left as it is
    assert not any(isinstance(m, FastCPUDropout) for m in model.modules())
    apply_kernels(model, torch.device("cpu"))
    assert all(m.kernel is kernels.cpu_attention for m in model.modules() if isinstance(m, Attention))
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 + 2 and all(type(m) is FastCPUDropout and m.p == 0.1 for m in dropouts)
    assert set(model.state_dict()) == set(GPT(model.config).state_dict())
