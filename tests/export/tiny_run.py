"""A small random model saved as a run folder, for the export tests."""

import json

import torch

from budgetlm.models.config import ModelConfig
from budgetlm.models.registry import build
from budgetlm.train.checkpoint import save_model


def tiny_run(folder, tokenizer, arch="gpt", seed=0, figures=None, **overrides):
    """A random model of `arch` saved as a run folder, every weight (norms and Canon mixes included) moved off its
    init; `figures` go into its summary.json (what the model card reports)."""
    torch.manual_seed(seed)
    config = ModelConfig(arch=arch, vocab_size=tokenizer.get_vocab_size(), context=32, n_layer=2, n_head=2,
                         d_model=32, **overrides)
    model = build(config.to_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    save_model(folder, model, model.config.to_dict(), tokenizer)
    summary = figures if figures is not None else {"best_val_bpb": 2.5}
    (folder / "summary.json").write_text(json.dumps({**summary, "params": model.num_params()}))
    return folder
