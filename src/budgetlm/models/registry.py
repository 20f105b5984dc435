"""Build a model from its saved config (config.json carries an `arch` key)."""

from __future__ import annotations

from torch import nn

from budgetlm.errors import UserError
from budgetlm.models.classifier import ClassifierConfig, build_classifier
from budgetlm.models.bert import BERT
from budgetlm.models.gpt import GPT
from budgetlm.models.t5 import T5
from budgetlm.models.config import ModelConfig

ARCHS = {"gpt": (GPT, ModelConfig), "bert": (BERT, ModelConfig), "t5": (T5, ModelConfig),
         "classifier": (build_classifier, ClassifierConfig)}
# what each language-model architecture learns to do (summary.json's `objective`)
OBJECTIVES = {"gpt": "causal_lm", "bert": "masked_lm", "t5": "span_corruption"}


def build(config_dict: dict) -> nn.Module:
    arch = config_dict.get("arch")
    if arch not in ARCHS:
        raise UserError(f"unknown model architecture {arch!r} in config.json; known: {', '.join(ARCHS)}")
    make, config_cls = ARCHS[arch]
    return make(config_cls.from_dict(config_dict))
