import math

import torch
import torch.nn.functional as F

from budgetlm.models import blocks
from budgetlm.models.blocks import Attention, Rotary, plain_attention, use_plain_attention


def reference_attention(attn: Attention, x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Causal self-attention written out head by head: QK-norm with each norm's own weight, then a
    rotation of each (first half, second half) channel pair by position · frequency."""
    b, t, d = x.shape
    h, hd = attn.n_head, attn.head_dim
    wq, wk, wv = attn.qkv.weight.split(d)
    outputs = []
    for head in range(h):
        cols = slice(head * hd, (head + 1) * hd)
        q, k, v = x @ wq[cols].T, x @ wk[cols].T, x @ wv[cols].T
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.q_norm.weight
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.k_norm.weight
        angle = torch.arange(t)[:, None] * base ** (-torch.arange(0, hd, 2) / hd)
        cos, sin = angle.cos(), angle.sin()

        def rotate(z):
            z1, z2 = z[..., : hd // 2], z[..., hd // 2 :]
            return torch.cat((z1 * cos - z2 * sin, z1 * sin + z2 * cos), -1)

        q, k = rotate(q), rotate(k)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        outputs.append(torch.softmax(scores, -1) @ v)
    return torch.cat(outputs, -1) @ attn.proj.weight.T


def test_attention_matches_a_head_by_head_reference():
    torch.manual_seed(0)
    attn = Attention(48, 3, causal=True).eval()
    with torch.no_grad():
        # distinct norm weights, so that swapping the query and key norms would show
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(2, 10, 48)
        rope = Rotary(16, 32).tables(0, 10, torch.float32)
        got = attn(x, rope=rope)
        assert torch.allclose(got, reference_attention(attn, x), atol=1e-5)


def test_attention_without_qk_norm_or_rotary_is_plain_causal_attention():
    torch.manual_seed(0)
    attn = Attention(32, 2, causal=True, qk_norm=False).eval()
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        q, k, v = (z.view(1, 6, 2, 16).transpose(1, 2) for z in attn.qkv(x).split(32, -1))
        expected = attn.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, 6, 32))
        assert torch.allclose(attn(x), expected, atol=1e-6)


# bf16 on a CPU writes attention out for short sequences; it must agree with sdpa's own kernel, forward and backward
def test_bf16_plain_attention_agrees_with_sdpa(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(64, 2, causal=True)
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
    monkeypatch.setattr(blocks, "CPU_PLAIN_ATTENTION_MAX_LEN", 0)
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
    drop = blocks.Dropout(0.1).train()
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
    drop = blocks.Dropout(0.25).train()
    x = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    torch.manual_seed(1)
    first = drop(x)
    torch.manual_seed(1)
    assert torch.equal(drop(x), first)
    assert first.dtype == torch.bfloat16 and first.shape == x.shape
    assert not torch.equal(drop(x), first)  # a fresh mask at the next call
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(blocks.Dropout(1.0).train()(x), torch.zeros_like(x))


def test_canon_is_a_causal_per_channel_convolution_plus_the_input():
    torch.manual_seed(0)
    canon = blocks.Canon(6, kernel=3)
    x = torch.randn(2, 9, 6)
    assert torch.equal(canon(x), x)  # starts as the identity
    with torch.no_grad():
        canon.weight.normal_()
    # conv1d reads its kernel oldest position first; ours is indexed by distance back
    kernel = canon.weight.flip(0).T.unsqueeze(1)
    reference = x + F.conv1d(F.pad(x.transpose(1, 2), (2, 0)), kernel, groups=6).transpose(1, 2)
    assert torch.allclose(canon(x), reference, atol=1e-6)
    y = x.clone()
    y[:, 5:] = 0
    assert torch.equal(canon(x)[:, :5], canon(y)[:, :5])


def test_canon_gradients_match_autograd_through_a_convolution():
    """The mix's backward is written by hand: both gradients must equal autograd's through F.conv1d."""
    torch.manual_seed(0)
    canon = blocks.Canon(4)
    with torch.no_grad():
        canon.weight.normal_()
    for length in (7, 2):  # a sequence shorter than the kernel too
        x = torch.randn(2, length, 4, requires_grad=True)
        upstream = torch.randn(2, length, 4)
        (canon(x) * upstream).sum().backward()
        kernel = canon.weight.detach().clone().requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        conv = F.conv1d(F.pad(x2.transpose(1, 2), (3, 0)), kernel.flip(0).T.unsqueeze(1), groups=4).transpose(1, 2)
        ((x2 + conv) * upstream).sum().backward()
        assert torch.allclose(x.grad, x2.grad, atol=1e-5)
        assert torch.allclose(canon.weight.grad, kernel.grad, atol=1e-5)
        canon.weight.grad = None
    double = blocks.Canon(3).double()
    with torch.no_grad():
        double.weight.normal_()
    assert torch.autograd.gradcheck(double.mix, (torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True),))


def test_canon_is_refused_in_a_bidirectional_block():
    try:
        blocks.Block(16, 2, 64, causal=False, canon=4)
    except ValueError as e:
        assert "causal" in str(e)
    else:
        raise AssertionError("a bidirectional block took a Canon mix")
