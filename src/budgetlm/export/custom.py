"""Every budgetlm language model as transformers custom code (trust_remote_code): the BERT, the T5, and the GPTs no
transformers family computes (Canon layers, a logit softcap, no QK-norm). The folder carries remote/
modeling_budgetlm.py and configuration_budgetlm.py, a small reimplementation of models/blocks.py's body that
needs torch and transformers only; config.json is budgetlm's own model config plus transformers' keys, and
model.safetensors holds budgetlm's weights under budgetlm's names, so both directions copy them unchanged."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import torch

from budgetlm.errors import UserError
from budgetlm.export.gpt import TEMPERATURE_KEY
from budgetlm.models.config import ModelConfig

MODEL_TYPE = "budgetlm"
CODE_FILES = ("configuration_budgetlm.py", "modeling_budgetlm.py")
# arch → (transformers class in modeling_budgetlm.py, the Auto class that loads it, the pipeline it serves)
CLASSES = {
    "bert": ("BudgetLMForMaskedLM", "AutoModelForMaskedLM", "fill-mask"),
    "t5": ("BudgetLMForSeq2SeqLM", "AutoModelForSeq2SeqLM", "text2text-generation"),
    "gpt": ("BudgetLMForCausalLM", "AutoModelForCausalLM", "text-generation"),
}


@dataclass(frozen=True)
class CustomCode:
    arch: str
    model_type = MODEL_TYPE

    @property
    def architecture(self) -> str:
        return CLASSES[self.arch][0]

    @property
    def auto_class(self) -> str:
        return CLASSES[self.arch][1]

    @property
    def pipeline_tag(self) -> str:
        return CLASSES[self.arch][2]

    code_files = CODE_FILES

    def hf_config(self, config: dict) -> dict:
        c = ModelConfig.from_dict(config).to_dict()
        c[TEMPERATURE_KEY] = c.pop("temperature")  # generate reads `temperature` as its own sampling setting
        return {"architectures": [self.architecture], "model_type": MODEL_TYPE,
                "auto_map": {"AutoConfig": "configuration_budgetlm.BudgetLMConfig",
                             self.auto_class: f"modeling_budgetlm.{self.architecture}"},
                **c, "is_encoder_decoder": self.arch == "t5", "tie_word_embeddings": False, "dtype": "float32",
                "use_cache": False}

    def hf_weights(self, state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        return dict(state)

    def budgetlm_config(self, hf: dict) -> dict:
        fields = ModelConfig.__dataclass_fields__
        ours = {k: v for k, v in hf.items() if k in fields and k not in ("size", "temperature")}
        return ModelConfig.from_dict({**ours, "temperature": hf.get(TEMPERATURE_KEY, 1.0)}).to_dict()

    def budgetlm_weights(self, hf_state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        return dict(hf_state)


def family_for(config: dict) -> CustomCode:
    return CustomCode(config["arch"])


def family_for_import(hf: dict) -> CustomCode:
    arch = hf.get("arch")
    if arch not in CLASSES:
        raise UserError(f"a budgetlm custom-code config.json names arch {arch!r}; importable: {', '.join(CLASSES)}")
    return CustomCode(arch)


def code(name: str) -> bytes:
    """A file of the modeling code shipped with budgetlm (package data, never imported by budgetlm itself)."""
    return (resources.files("budgetlm.export") / "remote" / name).read_bytes()
