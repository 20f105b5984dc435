"""What the benchmark scripts share."""

from __future__ import annotations

from collections.abc import Callable

import torch

from budgetlm.train.runtime import autocast


def training_step(model: torch.nn.Module, loss: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
                  device: torch.device, precision: str) -> Callable[[], None]:
    """One optimizer step as budgetlm's loop takes it: the loss under autocast, backward, clipping at 1, step."""
    def step() -> None:
        with autocast(device, precision):
            value = loss()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
