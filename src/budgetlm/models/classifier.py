"""A text classifier: a body that turns token ids into hidden states, and a head (pooling → dropout
→ linear) that turns them into class logits.

Bodies share one small interface: `forward(ids, mask) -> (batch, time, width)`, `width`,
`max_length` (the longest input it takes, or None), `pad_id` and `layers()` (parameter lists from
the input up, for layer-wise learning-rate decay). Inputs are right-padded with `pad_id`; `mask`
is 1 on real tokens."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from budgetlm.models.bert import BERT
from budgetlm.models.gpt import GPT
from budgetlm.models.t5 import T5
from budgetlm.models.config import ModelConfig

POOLINGS = ("mean", "last", "first")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(batch, time, width) → (batch, width) over the real tokens of each right-padded row."""
    if how == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    if how == "last":
        last = (mask.sum(1) - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if how == "first":
        return hidden[:, 0]
    raise ValueError(f"unknown pooling {how!r}; choose one of {', '.join(POOLINGS)}")


class ClassificationHead(nn.Module):
    def __init__(self, width: int, n_classes: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        self.pooling = pooling
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(width, n_classes)
        # small weights: every class starts near equally likely, so early gradients do not jolt the body
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(pool(hidden, mask, self.pooling)))


class GPTBody(nn.Module):
    """A budgetlm GPT without its language-model head. Causal attention over right-padded rows needs
    no mask: a real token only attends to earlier positions, never to the padding after it."""

    kind = "gpt"

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt
        self.width = gpt.config.d_model
        self.max_length = gpt.config.context
        self.pad_id = 0

    @classmethod
    def from_config(cls, config: dict) -> GPTBody:
        return cls(GPT(ModelConfig.from_dict(config)))

    def config_dict(self) -> dict:
        return self.gpt.config.to_dict()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.gpt.hidden(ids)

    def lm_loss(self, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the real tokens of each row, read from `hidden` through
        the pretrained (tied) output head: the auxiliary objective of GPT-1's fine-tuning."""
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return self.gpt.loss(hidden[:, :-1], targets)

    def token_embedding(self) -> nn.Module:
        return self.gpt.embed

    def layers(self) -> list[list[nn.Parameter]]:
        blocks = [list(b.parameters()) for b in self.gpt.blocks]
        blocks[-1] += list(self.gpt.norm.parameters())
        return [list(self.gpt.embed.parameters()), *blocks]


class EncoderBody(nn.Module):
    """A budgetlm BERT, or a T5's encoder (its decoder left out), without the language-model head: it reads each
    right-padded row both ways, so the mask hides the padding from the real tokens."""

    def __init__(self, model: BERT | T5, pad_id: int):
        super().__init__()
        self.kind = model.config.arch
        if isinstance(model, T5):  # classification reads the encoder only
            model.decoder, model.norm = nn.ModuleList(), nn.Identity()
        self.model = model
        self.width = model.config.d_model
        self.max_length = model.config.context
        self.pad_id = pad_id

    @classmethod
    def from_config(cls, config: dict) -> EncoderBody:
        model = {"bert": BERT, "t5": T5}[config["arch"]](ModelConfig.from_dict(config))
        return cls(model, config.get("pad_id", 0))

    def config_dict(self) -> dict:
        return {**self.model.config.to_dict(), "pad_id": self.pad_id}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.hidden(ids, mask)

    def token_embedding(self) -> nn.Module:
        return self.model.embed

    def layers(self) -> list[list[nn.Parameter]]:
        stack, norm = ((self.model.encoder, self.model.encoder_norm) if self.kind == "t5"
                       else (self.model.blocks, self.model.norm))
        blocks = [list(b.parameters()) for b in stack]
        blocks[-1] += list(norm.parameters())
        return [list(self.model.embed.parameters()), *blocks]


def body_class(kind: str) -> type[nn.Module]:
    from budgetlm.models.hf_encoder import HFEncoder
    from budgetlm.models.lstm import LSTMEncoder

    bodies = {"gpt": GPTBody, "bert": EncoderBody, "t5": EncoderBody, "hf": HFEncoder, "lstm": LSTMEncoder}
    if kind not in bodies:
        raise ValueError(f"unknown classifier body {kind!r}; known: {', '.join(bodies)}")
    return bodies[kind]


@dataclass
class ClassifierConfig:
    body: str                            # gpt | bert | t5 | hf | lstm
    body_config: dict                    # the body's own config, enough to rebuild it offline
    labels: list[str]                    # class index → label as text (as written, for a text label)
    pooling: str = "mean"
    dropout: float = 0.1
    max_length: int = 128                # inputs are truncated to this many tokens
    text_column: str = "text"            # what the training data called its columns (predict's default)
    label_column: str = "label"
    source: str = ""                     # where the body's weights came from
    members: int = 1                     # >1: an ensemble of this many classifiers of this config
    label_values: list | None = None     # class index → label as written, where some were numbers or booleans
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"arch": "classifier", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class Classifier(nn.Module):
    def __init__(self, config: ClassifierConfig, body: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.body = body if body is not None else body_class(config.body).from_config(config.body_config)
        self.head = ClassificationHead(self.body.width, len(config.labels), config.pooling, config.dropout)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, lm_loss: bool = False):
        """Class logits (batch, classes) in fp32, whatever precision the body ran in; with `lm_loss`,
        also the body's language-modelling loss on the same inputs (a body with `lm_loss` only)."""
        hidden = self.body(ids, mask)
        logits = self.head(hidden, mask).float()
        if lm_loss:
            return logits, self.body.lm_loss(hidden, ids, mask)
        return logits

    @property
    def pad_id(self) -> int:
        return self.body.pad_id

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameters from the input up: the body's layers, then the head."""
        return [*self.body.layers(), list(self.head.parameters())]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Ensemble(nn.Module):
    """Classifiers of one config trained apart (other seeds), read as one: the log of their mean class
    probabilities, so softmax and argmax downstream see the averaged prediction."""

    def __init__(self, config: ClassifierConfig, members: list[Classifier] | None = None):
        super().__init__()
        self.config = config
        single = ClassifierConfig.from_dict({**config.to_dict(), "members": 1})
        self.members = nn.ModuleList(members if members is not None
                                     else [Classifier(single) for _ in range(config.members)])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(ids, mask).softmax(-1) for m in self.members]).mean(0)
        return probs.clamp(min=1e-30).log()

    @property
    def pad_id(self) -> int:
        return self.members[0].pad_id

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_classifier(config: ClassifierConfig) -> nn.Module:
    return Ensemble(config) if config.members > 1 else Classifier(config)
