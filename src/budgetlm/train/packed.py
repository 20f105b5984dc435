"""Linear layers with weights pre-packed for oneDNN, for inference on a CPU.

A decoding step multiplies one row by every weight matrix of the model. PyTorch's plain matmul lays the
weight out for its kernel again at every call; packed once, the same products ran twice as fast here, and
cached decoding 45% faster in bf16 (docs/performance.md). PyTorch offers the packing only through the
operators Inductor itself uses (`torch.ops.mkldnn`), so where they are missing everything stays F.linear.
The packed weights are a copy made once: a packed model is for inference only. The original weights stay
in place, so its state dict, parameter count and saved files do not change.
"""

from __future__ import annotations

import torch
from torch import nn


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    ops = torch.ops.mkldnn
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """y = x·Wᵀ (+ b) with W packed for oneDNN, laid out for a single row of input (one decoding step)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        """Parameters passed in stay registered under their names (`weight`, `bias`); a plain tensor
        (a tied weight owned elsewhere) is only read."""
        super().__init__()
        self.dtype = weight.dtype  # read at every call: a plain attribute, not a lookup through the weight
        self.weight, self.bias = weight, bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, bias, "none", [], "")

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}, dtype={self.dtype}"


def pack_linears(module: nn.Module) -> int:
    """Replace every nn.Linear inside `module` by its PackedLinear; returns how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child.weight, child.bias))
            count += 1
        else:
            count += pack_linears(child)
    return count


def pack_for_inference(model) -> bool:
    """Every matmul weight of a GPT packed for oneDNN, after its weights were cast for inference (decoding on
    a CPU). False, and nothing changed, where packing is unavailable."""
    weight = model.embed.weight
    if not packing_available(weight.device, weight.dtype):
        return False
    pack_linears(model.blocks)
    model.output_kernel = PackedLinear(weight.detach())  # tied: the embedding owns the weight
    return True
