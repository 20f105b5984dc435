"""Build a model from its saved config (config.json carries an `arch` key)."""

from __future__ import annotations

from torch import nn

from budgetlm.errors import UserError
from budgetlm.models.classifier import ClassifierConfig, build_classifier
from budgetlm.models.gpt import GPT
from budgetlm.models.config import ModelConfig

ARCHS = {"gpt": (GPT, ModelConfig), "classifier": (build_classifier, ClassifierConfig)}


def build(config_dict: dict) -> nn.Module:
    arch = config_dict.get("arch")
    if arch not in ARCHS:
        raise UserError(f"unknown model architecture {arch!r} in config.json; known: {', '.join(ARCHS)}")
    make, config_cls = ARCHS[arch]
    return make(config_cls.from_dict(config_dict))
