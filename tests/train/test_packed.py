import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from budgetlm.models.sampling import generate
from budgetlm.train.kernels import cache_dtype
from budgetlm.train.packed import PackedLinear, pack_for_inference, pack_linears, packing_available
from tests.models.tiny_gpt import SMALL, forward_in_chunks, tiny_gpt, tokens

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not packing_available(CPU, torch.float32), reason="no oneDNN packing here")
SWIGLU = dataclasses.replace(SMALL, mlp="swiglu")


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_linear_computes_the_same_product(dtype, tolerance):
    torch.manual_seed(0)
    linear = nn.Linear(48, 24).to(dtype)
    packed = PackedLinear(linear.weight, linear.bias)
    for x in (torch.randn(1, 48), torch.randn(3, 5, 48)):
        x = x.to(dtype)
        expected = F.linear(x, linear.weight, linear.bias)
        got = packed(x)
        assert got.shape == expected.shape and got.dtype == dtype
        assert torch.allclose(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


def test_pack_linears_replaces_every_linear_and_nothing_else():
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4)))
    assert pack_linears(model) == 2
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model[2][1], nn.LayerNorm)


def test_packed_gpt_keeps_its_logits_generations_and_saved_keys():
    model = tiny_gpt(SWIGLU)
    keys = set(model.state_dict())
    x = tokens(2, 20)
    prompt = tokens(1, 4)
    with torch.no_grad():
        reference = model(x)
    greedy = [int(t) for t in generate(model, prompt, 12, temperature=0)]
    assert pack_for_inference(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), reference, atol=1e-5)
    assert [int(t) for t in generate(model, prompt, 12, temperature=0)] == greedy
    assert set(model.state_dict()) == keys


def test_bf16_packed_decoding_tracks_the_fp32_model():
    model = tiny_gpt(SWIGLU)
    x = tokens(1, 20)
    with torch.no_grad():
        reference = model(x)
        pack_for_inference(model.cast_weights(torch.bfloat16))
        assert cache_dtype(torch.device("cpu"), torch.bfloat16) == torch.float32  # fp32 keys and values on a CPU
        stepped = forward_in_chunks(model, x, range(1, 20), torch.float32)  # one token at a time
    assert stepped.dtype == torch.bfloat16
    assert torch.allclose(stepped.float(), reference, atol=0.05)


def test_unpackable_dtype_leaves_the_model_as_it_was():
    model = tiny_gpt(SWIGLU).cast_weights(torch.float16)
    assert not pack_for_inference(model)
    assert model.output_kernel is None and isinstance(model.blocks[0].attn.qkv, nn.Linear)
