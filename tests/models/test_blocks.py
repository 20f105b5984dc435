import math

import torch
import torch.nn.functional as F

from budgetlm.models import blocks
from budgetlm.models.blocks import Attention, Rotary


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


def reference_general(x, memory, wq, wk, wv, wo, n_head, *, causal, q_norm=None, k_norm=None):
    """Attention written out head by head with no rotary: queries from x, keys and values from `memory`
    (x itself for self-attention), an optional causal mask, optional per-head RMSNorm on q and k."""
    b, t, d = x.shape
    hd = d // n_head
    outputs = []
    for head in range(n_head):
        cols = slice(head * hd, (head + 1) * hd)
        q, k, v = x @ wq[cols].T, memory @ wk[cols].T, memory @ wv[cols].T
        if q_norm is not None:
            q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * q_norm
            k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * k_norm
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        if causal:
            scores = scores.masked_fill(torch.ones(t, memory.shape[1], dtype=torch.bool).triu(1), float("-inf"))
        outputs.append(torch.softmax(scores, -1) @ v)
    return torch.cat(outputs, -1) @ wo.T


def test_bidirectional_attention_sees_both_sides_and_matches_a_reference():
    torch.manual_seed(0)
    attn = Attention(32, 2, causal=False, qk_norm=False).eval()
    x = torch.randn(2, 7, 32)
    wq, wk, wv = attn.qkv.weight.split(32)
    with torch.no_grad():
        got = attn(x)
        assert torch.allclose(got, reference_general(x, x, wq, wk, wv, attn.proj.weight, 2, causal=False), atol=1e-5)
        changed = x.clone()
        changed[:, -1] += 1.0  # the last position changes what every earlier one reads
        assert not torch.allclose(attn(changed)[:, 0], got[:, 0], atol=1e-4)


def test_cross_attention_reads_the_memory_and_matches_a_reference():
    torch.manual_seed(0)
    attn = Attention(32, 4, causal=False, cross=True).eval()
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
        x, memory = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
        wk, wv = attn.kv.weight.split(32)
        expected = reference_general(x, memory, attn.q.weight, wk, wv, attn.proj.weight, 4, causal=False,
                                     q_norm=attn.q_norm.weight, k_norm=attn.k_norm.weight)
        assert torch.allclose(attn(x, memory=memory), expected, atol=1e-5)
        assert attn(x, memory=memory[:, :4]).shape == (2, 5, 32)  # any memory length


def test_a_decoder_block_adds_cross_attention_to_its_residual_stream():
    torch.manual_seed(0)
    block = blocks.Block(32, 2, 64, causal=True, cross_attention=True).eval()
    x, memory = torch.randn(1, 6, 32), torch.randn(1, 4, 32)
    rope = Rotary(16, 8).tables(0, 6, torch.float32)
    with torch.no_grad():
        with_memory = block(x, memory=memory, rope=rope)
        other = block(x, memory=torch.randn(1, 4, 32), rope=rope)
        h = x + block.attn(block.attn_norm(x), rope=rope)
        h = h + block.cross(block.cross_norm(h), memory=memory)
        assert torch.allclose(with_memory, h + block.mlp(block.mlp_norm(h)), atol=1e-5)
    assert not torch.allclose(with_memory, other, atol=1e-4)
