"""Muon on the hidden weight matrices and AdamW on everything else, behind one optimizer.

Muon orthogonalizes the update of a matrix, which suits the Linear layers of the network body but
not embeddings, the output head, norms or biases (Jordan et al. 2024, "Muon: An optimizer for hidden
layers in neural networks"); those stay with AdamW.

Written here rather than torch.optim.Muon because that one cannot do two things the loop needs: take
GradScaler's `found_inf`, so that a step with a non-finite gradient is skipped on the device without the host
waiting for a GPU, and batch the Newton–Schulz iteration over matrices of one shape (below)."""

from __future__ import annotations

import math

import torch
from torch import nn

from budgetlm.train.parallel import like, whole_matrix

# A Linear under a module of one of these names is an output head, not a hidden layer.
HEAD_NAMES = ("head", "lm_head", "classifier", "output")


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """Trainable 2-D weights of the Linear layers in the network body: not embedding weights (also
    when a Linear shares one as a tied output head), not Linears inside a module named in HEAD_NAMES."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found: dict[int, nn.Parameter] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(part in HEAD_NAMES for part in name.split(".")):
            continue
        w = module.weight
        if w.requires_grad and w.dim() == 2 and id(w) not in embeddings:
            found.setdefault(id(w), w)
    return list(found.values())


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of Jordan et al.: steep at zero, 5 steps suffice


# Matrices of one shape are orthogonalized together, as a batch, up to this many elements at a time: one
# batched product instead of one per layer (with the fused multiply-adds below, about 20% less time for the
# iteration over the reference 6×384 model's 24 matrices on a 2-core CPU; batching alone about 6%), without
# a copy of every matrix of a large model at once.
BATCH_ELEMENTS = 1 << 25


def stacked(matrices: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The matrices as one batch in `dtype`, converted as they are copied in: one pass over them where stacking
    and then converting took two (with the other copies the iteration's precision asked for, 15% of a Muon step
    at the reference shape, profiled)."""
    batch = torch.empty((len(matrices), *matrices[0].shape), dtype=dtype, device=matrices[0].device)
    for row, matrix in zip(batch, matrices):
        row.copy_(matrix)
    return batch


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately U·Vᵀ of g = U·S·Vᵀ by a Newton–Schulz iteration (singular values land near 1), for a
    matrix or a batch of them (…, rows, cols), in `dtype` and returned in g's."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        # fused multiply-adds: b·gram + c·gram², then a·x + that·x
        if x.dim() == 2:
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        else:
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon: SGD momentum whose update of each 2-D weight is orthogonalized.

    Written here rather than taken from torch.optim.Muon, which runs Newton–Schulz in bf16 always:
    on a CPU without bf16 instructions that made a step about 30× slower than AdamW's (measured).
    Here the iteration runs in bf16 only where the device multiplies bf16 fast, else in fp32.
    `adjust_lr_fn="match_rms_adamw"` scales the update to AdamW's RMS (0.2·√max(rows, cols)), so
    AdamW's learning rate and weight decay carry over (Liu et al. 2025); "original" uses
    √max(1, rows/cols) (Jordan et al. 2024)."""

    _step_supports_amp_scaling = True  # takes GradScaler's grad_scale and found_inf (see step)

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7,
                 adjust_lr_fn: str = "match_rms_adamw", ns_dtype: torch.dtype = torch.float32):
        if adjust_lr_fn not in ("match_rms_adamw", "original"):
            raise ValueError(f"adjust_lr_fn must be match_rms_adamw or original, not {adjust_lr_fn!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        eps=eps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D weight matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # GradScaler's protocol, as fused AdamW keeps it: gradients still scaled by `grad_scale`, and
        # `found_inf` 1 where the whole update must be skipped, decided on the device without a host read.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        keep = None if found_inf is None else found_inf == 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            grads = [p.grad for p in params]
            if grad_scale is not None:
                grads = torch._foreach_div(grads, grad_scale)
            if keep is not None:
                # a skipped step sees its momentum as the gradient: every update below is then exactly nil
                grads = [torch.where(keep, g, b) for g, b in zip(grads, bufs)]
            # One kernel per list rather than per matrix: on a GPU the step is bound by launches.
            torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
            updates = torch._foreach_lerp(grads, bufs, group["momentum"]) if group["nesterov"] else bufs
            decay = 1 - group["lr"] * group["weight_decay"]
            if keep is not None:
                decay = torch.where(keep, decay, 1.0)
            by_shape: dict[tuple, list[tuple[nn.Parameter, torch.Tensor]]] = {}  # (rows, cols, device, dtype)
            for p, update in zip(params, updates):
                by_shape.setdefault((*p.shape, p.device, p.dtype), []).append((p, update))
            for items in by_shape.values():
                rows, cols = items[0][0].shape
                if group["adjust_lr_fn"] == "match_rms_adamw":
                    scale = 0.2 * math.sqrt(max(rows, cols))
                else:
                    scale = math.sqrt(max(1.0, rows / cols))
                per_batch = max(1, BATCH_ELEMENTS // (rows * cols))
                for start in range(0, len(items), per_batch):
                    chunk = items[start : start + per_batch]
                    # under FSDP each matrix is gathered whole: Newton–Schulz on a shard would be wrong
                    ortho = orthogonalize(stacked([whole_matrix(u) for _, u in chunk], self.ns_dtype), group["ns_steps"],
                                          group["eps"], self.ns_dtype).unbind()
                    weights, step_size = [p for p, _ in chunk], -group["lr"] * scale
                    torch._foreach_mul_(weights, decay)
                    ortho = [like(o, p) for o, p in zip(ortho, weights)]  # each rank's own shard, under FSDP
                    if keep is not None:  # a skipped step adds zeros
                        ortho = [torch.where(keep, o, 0) for o in ortho]
                    # added in the weights' precision, without a converted copy of the update
                    torch._foreach_add_(weights, ortho, alpha=step_size)
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """Steps, zeroes, saves and restores a Muon and an AdamW as one optimizer.

    Its `param_groups` are the two optimizers' own group dicts (Muon's first) and its `state` is
    theirs, so setting `group["lr"]` here reaches the optimizer that uses the group, and the
    state_dict has the ordinary layout."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})
        self._share()
        # GradScaler's grad_scale and found_inf reach both, where AdamW's (fused) kernel takes them
        self._step_supports_amp_scaling = getattr(adamw, "_step_supports_amp_scaling", False)

    def _share(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state  # their parameters are disjoint

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for name in ("grad_scale", "found_inf"):
            value = getattr(self, name, None)
            for inner in (self.muon, self.adamw):
                setattr(inner, name, value)
        try:
            self.muon.step()
            self.adamw.step()
        finally:
            for inner in (self.muon, self.adamw):
                del inner.grad_scale, inner.found_inf
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # Loading replaces the group dicts and the state: hand the new ones to the two optimizers.
        super().load_state_dict(state_dict)
        self._share()
