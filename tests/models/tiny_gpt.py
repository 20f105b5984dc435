"""The small GPTs the model and kernel tests share, and a helper that feeds a sequence through the decoding cache."""

import torch

from budgetlm.models.config import ModelConfig
from budgetlm.models.gpt import GPT

VOCAB = 97
SMALL = ModelConfig(vocab_size=VOCAB, context=32, n_layer=2, n_head=2, d_model=32)
CANON = ModelConfig(vocab_size=VOCAB, context=32, n_layer=2, n_head=2, d_model=32, canon=4)


def tiny_gpt(config: ModelConfig = SMALL, seed: int = 0) -> GPT:
    """An evaluation-mode model drawn from `seed`, whose Canon mixes (zero, the identity, when new) carry random
    weights."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".canon_" in name:
                p.normal_(0, 0.3)
    return model


def tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length))


def forward_in_chunks(model: GPT, x: torch.Tensor, cuts, cache_dtype=None) -> torch.Tensor:
    """Logits of x fed through the KV cache in chunks ending at `cuts`, then the rest."""
    caches = model.new_caches(x.shape[0], "cpu", cache_dtype)
    bounds = (0, *cuts, x.shape[1])
    return torch.cat([model(x[:, a:b], caches=caches) for a, b in zip(bounds, bounds[1:])], dim=1)
