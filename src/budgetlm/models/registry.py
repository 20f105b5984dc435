"""Build a model from its saved config (config.json carries an `arch` key)."""

from __future__ import annotations

from torch import nn

from budgetlm.errors import UserError
from budgetlm.models.classifier import Classifier, ClassifierConfig
from budgetlm.models.gpt import GPT, GPTConfig

ARCHS = {"gpt": (GPT, GPTConfig), "classifier": (Classifier, ClassifierConfig)}


def build(config_dict: dict) -> nn.Module:
    arch = config_dict.get("arch")
    if arch not in ARCHS:
        raise UserError(f"unknown model architecture {arch!r} in config.json; known: {', '.join(ARCHS)}")
    model_cls, config_cls = ARCHS[arch]
    return model_cls(config_cls.from_dict(config_dict))
