"""The model's one config (as litgpt's `Config`): the shape and the choices of the Transformer body. The
plan fills what it decides, flags and TOML override it, config.json saves it, and the model is built from
it; nothing else holds a copy of the shape. Fields left None are for the plan (or a preset) to decide."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from budgetlm.settings import Section, opt

SIZES = {
    # name: (n_layer, d_model, n_head)
    "tiny": (2, 128, 2),
    "small": (4, 256, 4),
    "base": (6, 384, 6),
    "medium": (8, 512, 8),
    "large": (12, 768, 12),
}
ARCHS = ("gpt", "bert", "t5")
SHAPE = ("vocab_size", "context", "n_layer", "n_head", "d_model")  # what a built model needs


@dataclass
class ModelConfig(Section):
    arch: str = opt("gpt", help="architecture: gpt (decoder, next-token), bert (encoder, masked tokens) or t5 "
                    "(encoder-decoder, corrupted spans); docs/architectures.md", choices=ARCHS)
    size: str | None = opt(None, help="preset size", choices=tuple(SIZES))
    vocab_size: int | None = opt(None, low=2, flag=False, help="token vocabulary (the tokenizer's, rounded up to a "
                                 "multiple of 64 for the head's matmul)")
    n_layer: int | None = opt(None, low=1, help="Transformer blocks")
    d_model: int | None = opt(None, low=8, help="width of the residual stream")
    n_head: int | None = opt(None, low=1, help="attention heads")
    context: int | None = opt(None, low=2, help="context length in tokens")
    mlp: str = opt("relu2", help="feed-forward type: ReLU² (Primer) or SwiGLU", choices=("relu2", "swiglu"))
    mlp_ratio: float = opt(4.0, above=0, help="feed-forward width ÷ d_model")
    dropout: float | None = opt(None, low=0, high=0.95, help="dropout on embeddings and residual branches "
                                "(default: planned, 0.1 when the budget repeats the text more than 4 times, else 0)")
    attention_dropout: float | None = opt(0.0, low=0, high=0.95, help="dropout on attention probabilities (default "
                                          "0: a random mask over every score, slow on a CPU; docs/planner.md)")
    qk_norm: bool = opt(True, flag=False, help="RMSNorm on each head's queries and keys")
    rope_base: float = opt(10000.0, above=0, flag=False, help="base of the rotary position angles")
    logit_softcap: float = opt(0.0, low=0, help="cap logits at ±c with c·tanh(x/c); 0 turns it off")
    canon: int | None = opt(None, low=0, help="Canon layers: mix each position with the previous canon-1 before "
                            "attention and MLP, a causal per-channel convolution (default: 4 where the plan expects a GPT to "
                            "read its text more than 10 times, else 0 = off; docs/planner.md)")
    temperature: float = opt(1.0, above=0, flag=False, help="logits are divided by it; fitted on held-out text "
                             "after pretraining (eval/calibration.py)")

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.d_model)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def missing(self) -> list[str]:
        """The shape fields still unset (left for the plan)."""
        return [name for name in SHAPE if getattr(self, name) is None]

    def to_dict(self) -> dict:
        """What config.json saves: the built shape (a preset only names one, so it is left out)."""
        d = dataclasses.asdict(self)
        d.pop("size")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "attention_dropout" not in d:  # saved before it existed: the dropout applied there too
            known["attention_dropout"] = None
        return cls(**known)
