"""Muon on the hidden weight matrices and AdamW on everything else, behind one optimizer.

Muon orthogonalizes the update of a matrix, which suits the Linear layers of the network body but
not embeddings, the output head, norms or biases (Jordan et al. 2024, "Muon: An optimizer for hidden
layers in neural networks"); those stay with AdamW."""

from __future__ import annotations

import torch
from torch import nn

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


class MuonWithAdamW(torch.optim.Optimizer):
    """Steps, zeroes, saves and restores a Muon and an AdamW as one optimizer.

    Its `param_groups` are the two optimizers' own group dicts (Muon's first) and its `state` is
    theirs, so setting `group["lr"]` here reaches the optimizer that uses the group, and the
    state_dict has the ordinary layout."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})
        self._share()

    def _share(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state  # their parameters are disjoint

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # Loading replaces the group dicts and the state: hand the new ones to the two optimizers.
        super().load_state_dict(state_dict)
        self._share()
