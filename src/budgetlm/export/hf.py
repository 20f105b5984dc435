"""Hugging Face folders that transformers' Auto classes load with no custom code, and back.

Each budgetlm architecture maps to transformers families in a small module of its own (export/gpt.py); a family
says how config.json and the weights translate, both ways. This module writes and reads the folder around them:
config.json, model.safetensors, generation_config.json, the tokenizer files and a README.md model card. Neither
direction imports transformers: both only write or read JSON and safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer, processors
from torch import nn

from budgetlm.data.tokenizer import EOT, eot_id
from budgetlm.errors import UserError
from budgetlm.export import gpt
from budgetlm.train.checkpoint import atomic_write_bytes, save_weights


class Family(Protocol):
    model_type: str     # transformers' config.json `model_type`
    architecture: str   # the transformers class AutoModel picks
    arch: str           # budgetlm's config.json `arch`

    def hf_config(self, config: dict) -> dict: ...
    def hf_weights(self, state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]: ...
    def budgetlm_config(self, hf: dict) -> dict: ...
    def budgetlm_weights(self, hf_state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]: ...


# budgetlm arch → the function picking its family (or refusing); transformers model_type → family
EXPORTERS = {"gpt": gpt.family_for}
# architectures whose body no transformers family computes exactly (checked against transformers 5.25)
NO_FAMILY = {
    "bert": "no transformers masked-LM family computes its body: the closest, ModernBERT (rotary, no biases, "
            "gated MLP), normalizes with LayerNorm, has no per-head q/k norm and puts a dense layer and a norm "
            "before its output head",
    "t5": "transformers' T5 family places positions by learned relative-position buckets, not rotary angles, and "
          "has no per-head q/k norm",
}
IMPORTERS: dict[str, Family] = {f.model_type: f for f in gpt.FAMILIES}


def family_for_export(config: dict) -> Family:
    arch = config.get("arch")
    if arch is None:
        raise UserError("config.json names no budgetlm arch: give the --out folder of a budgetlm run")
    if arch in NO_FAMILY:
        raise UserError(f"a {arch} model cannot be exported to transformers: {NO_FAMILY[arch]}")
    if arch not in EXPORTERS:
        raise UserError(f"a {arch} model cannot be exported to transformers yet; exportable: {', '.join(EXPORTERS)}")
    return EXPORTERS[arch](config)


def write(out: Path, model: nn.Module, config: dict, tokenizer: Tokenizer, summary: dict | None,
          source: str) -> Family:
    """`out` filled with the model as its transformers family; returns the family."""
    family = family_for_export(config)
    eot = eot_id(tokenizer)
    hf_config = {**family.hf_config(config), "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
    state = family.hf_weights(model.state_dict(), config)
    try:
        save_weights(state, out / "model.safetensors")
        _write_json(out / "config.json", hf_config)
        _write_json(out / "generation_config.json",
                    {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot})
        atomic_write_bytes(out / "tokenizer.json", _with_leading_eot(tokenizer).to_str().encode())
        _write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT, "pad_token": EOT,
            "model_max_length": hf_config["max_position_embeddings"], "clean_up_tokenization_spaces": False})
        atomic_write_bytes(out / "README.md", model_card(family, hf_config, summary, source).encode())
    except OSError as e:
        raise UserError(f"could not write {out} ({e.strerror or e}); free space or choose another --out") from None
    return family


def read(folder: Path) -> tuple[dict, dict[str, torch.Tensor], Tokenizer]:
    """(budgetlm config, budgetlm weights, tokenizer) from a transformers folder of a family we export."""
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json; give a folder saved by transformers or budgetlm export")
    try:
        hf_config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg})") from None
    model_type = hf_config.get("model_type")
    if model_type not in IMPORTERS:
        raise UserError(f"{folder}: a {model_type} model cannot be imported; importable: {', '.join(IMPORTERS)}")
    family = IMPORTERS[model_type]
    try:
        config = family.budgetlm_config(hf_config)
    except KeyError as e:
        raise UserError(f"{path}: lacks {e}") from None
    state = family.budgetlm_weights(_read_weights(folder), config)
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise UserError(f"{folder}: no tokenizer.json (budgetlm reads fast tokenizers only)")
    tokenizer = Tokenizer.from_file(str(tok_path))
    # budgetlm puts the document separator before a text itself, and callers that do not say
    # add_special_tokens=False would get it twice
    tokenizer.post_processor = None
    return config, state, tokenizer


def model_card(family: Family, hf_config: dict, summary: dict | None, source: str) -> str:
    """A short README.md: what the model is, how it was trained, how to load it."""
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- budgetlm", "---", "",
             f"# {Path(source).name}", "",
             (f"A {hf_config['num_hidden_layers']}-layer, {hf_config['hidden_size']}-wide language model trained "
              f"with budgetlm and exported to transformers as `{family.architecture}` ({family.model_type})."), ""]
    if summary:
        figures = [("best validation bits per byte", summary.get("best_val_bpb")),
                   ("best validation loss (nats per token)", summary.get("best_val_loss")),
                   ("parameters", summary.get("params")), ("tokens seen", summary.get("tokens_seen")),
                   ("optimizer steps", summary.get("steps")), ("budget (s)", summary.get("budget_s")),
                   ("wall clock (s)", summary.get("wall_s")), ("device", summary.get("device")),
                   ("precision", summary.get("precision")), ("stop reason", summary.get("stop_reason")),
                   ("fitted temperature (folded into the final norm)", summary.get("temperature")),
                   ("training data", (summary.get("config") or {}).get("data", {}).get("data"))]
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {name} | {_figure(value)} |" for name, value in figures if value is not None]
        lines += [""]
    else:
        lines += ["The run folder had no summary.json, so no training figures are given.", ""]
    lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer  # PATH: this folder",
              'tok = AutoTokenizer.from_pretrained("PATH")',
              'model = AutoModelForCausalLM.from_pretrained("PATH")',
              ('print(tok.decode(model.generate(**tok("ROMEO:", return_tensors="pt"), max_new_tokens=40)[0], '
               'skip_special_tokens=True))'),
              "```", "",
              f"The tokenizer puts `{EOT}` (the document separator budgetlm trained with) before every text.", ""]
    return "\n".join(lines)


def _figure(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _with_leading_eot(tokenizer: Tokenizer) -> Tokenizer:
    """A copy that starts every encoded text with the document separator, as budgetlm's training and
    `generate` do, so transformers' tokenizer(text) feeds the model what it was trained on."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B:1", special_tokens=[(EOT, eot_id(tokenizer))])
    return copy


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or every shard its index names."""
    index = folder / "model.safetensors.index.json"
    files = (sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
             if index.is_file() else [folder / "model.safetensors"])
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.is_file():
            raise UserError(f"{folder}: no {path.name} (budgetlm reads safetensors weights only)")
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: unreadable or corrupted weights ({e})") from None
    return state


def _write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())
