"""Hugging Face folders that transformers' Auto classes load, and back.

A GPT that a transformers family computes goes out as that family, with no custom code (export/gpt.py); every
other language model (BERT, T5, GPTs with Canon layers or a softcap) goes out with budgetlm's modeling code, for
trust_remote_code (export/custom.py). A family says how config.json and the weights translate, both ways. This
module writes and reads the folder around them: config.json, model.safetensors, generation_config.json, the
tokenizer files, the modeling code where needed and a README.md model card. Neither direction imports
transformers: both only write or read JSON, safetensors and the shipped code files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer, processors
from torch import nn

from budgetlm.data.tokenizer import CLS, EOT, MASK, PAD, SENTINELS, SEP, eot_id, sentinel
from budgetlm.errors import UserError
from budgetlm.export import custom, gpt
from budgetlm.models.config import ModelConfig
from budgetlm.train.checkpoint import atomic_write_bytes, save_weights


class Family(Protocol):
    model_type: str     # transformers' config.json `model_type`
    architecture: str   # the transformers class AutoModel picks
    arch: str           # budgetlm's config.json `arch`
    auto_class: str     # the transformers Auto class that loads it
    pipeline_tag: str
    code_files: tuple[str, ...]  # modeling code the folder carries (trust_remote_code); none for native families

    def hf_config(self, config: dict) -> dict: ...
    def hf_weights(self, state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]: ...
    def budgetlm_config(self, hf: dict) -> dict: ...
    def budgetlm_weights(self, hf_state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]: ...


def _gpt_family(config: dict) -> Family:
    return gpt.family_for(config) or custom.family_for(config)


# budgetlm arch → the function picking its family
EXPORTERS: dict[str, Callable[[dict], Family]] = {"gpt": _gpt_family, "bert": custom.family_for,
                                                  "t5": custom.family_for}
# transformers model_type → the function picking the family from its config.json
IMPORTERS: dict[str, Callable[[dict], Family]] = {
    **{f.model_type: (lambda hf, f=f: f) for f in gpt.FAMILIES}, custom.MODEL_TYPE: custom.family_for_import}


def family_for_export(config: dict) -> Family:
    arch = config.get("arch")
    if arch is None:
        raise UserError("config.json names no budgetlm arch: give the --out folder of a budgetlm run")
    if arch not in EXPORTERS:
        raise UserError(f"a {arch} model cannot be exported to transformers (only language models are); "
                        f"exportable: {', '.join(EXPORTERS)}")
    return EXPORTERS[arch](config)


def write(out: Path, model: nn.Module, config: dict, tokenizer: Tokenizer, summary: dict | None,
          source: str) -> Family:
    """`out` filled with the model as its transformers family; returns the family."""
    family = family_for_export(config)
    ids = _special_ids(family.arch, tokenizer)
    hf_config = {**family.hf_config(config), **ids}
    state = family.hf_weights(model.state_dict(), config)
    try:
        save_weights(state, out / "model.safetensors")
        _write_json(out / "config.json", hf_config)
        if family.arch != "bert":  # what generate reads; a masked LM does not generate
            _write_json(out / "generation_config.json", ids)
        for name in family.code_files:
            atomic_write_bytes(out / name, custom.code(name))
        atomic_write_bytes(out / "tokenizer.json", _with_leading_eot(tokenizer).to_str().encode())
        _write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", **_special_tokens(family.arch),
            "model_max_length": ModelConfig.from_dict(config).context, "clean_up_tokenization_spaces": False})
        atomic_write_bytes(out / "README.md", model_card(family, config, summary, source).encode())
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
    family = IMPORTERS[model_type](hf_config)
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


# what the model card shows of each kind of model: a prompt and the lines that use it
USAGE = {
    "gpt": ["from transformers import {auto}, AutoTokenizer",
            "tok = AutoTokenizer.from_pretrained(PATH{remote})", "model = {auto}.from_pretrained(PATH{remote})",
            'ids = model.generate(**tok("ROMEO:", return_tensors="pt"), max_new_tokens=40, do_sample=False)',
            "print(tok.decode(ids[0], skip_special_tokens=True))"],
    "bert": ["from transformers import pipeline", 'fill = pipeline("fill-mask", model=PATH{remote})',
             f'print(fill("ROMEO: what {MASK} through yonder"))'],
    "t5": ["from transformers import {auto}, AutoTokenizer",
           "tok = AutoTokenizer.from_pretrained(PATH{remote})", "model = {auto}.from_pretrained(PATH{remote})",
           f'ids = model.generate(**tok("ROMEO: what {sentinel(0)} through yonder", return_tensors="pt"),',
           f'                     max_new_tokens=20, eos_token_id=tok.convert_tokens_to_ids("{sentinel(1)}"))',
           "print(tok.decode(ids[0]))  # [PAD]<extra_id_0> the span for it<extra_id_1>"],
}


def model_card(family: Family, config: dict, summary: dict | None, source: str) -> str:
    """A short README.md: what the model is, how it was trained, how to load it."""
    c = ModelConfig.from_dict(config)
    remote = bool(family.code_files)
    how = (f"with its modeling code (`modeling_budgetlm.py`, loaded with `trust_remote_code=True`) as "
           f"`{family.architecture}`" if remote else f"as `{family.architecture}` ({family.model_type})")
    lines = ["---", "library_name: transformers", f"pipeline_tag: {family.pipeline_tag}", "tags:", "- budgetlm",
             "---", "", f"# {Path(source).name}", "",
             (f"A {c.n_layer}-layer, {c.d_model}-wide {c.arch.upper()} trained with budgetlm and exported to "
              f"transformers {how}."), ""]
    if summary:
        folded = "applied to the logits" if remote else "folded into the final norm"
        figures = [("best validation bits per byte", summary.get("best_val_bpb")),
                   ("best validation loss (nats per token)", summary.get("best_val_loss")),
                   ("parameters", summary.get("params")), ("tokens seen", summary.get("tokens_seen")),
                   ("optimizer steps", summary.get("steps")), ("budget (s)", summary.get("budget_s")),
                   ("wall clock (s)", summary.get("wall_s")), ("device", summary.get("device")),
                   ("precision", summary.get("precision")), ("stop reason", summary.get("stop_reason")),
                   (f"fitted temperature ({folded})", summary.get("temperature")),
                   ("training data", (summary.get("config") or {}).get("data", {}).get("data"))]
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {name} | {_figure(value)} |" for name, value in figures if value is not None]
        lines += [""]
    else:
        lines += ["The run folder had no summary.json, so no training figures are given.", ""]
    usage = [line.format(auto=family.auto_class, remote=", trust_remote_code=True" if remote else "")
             for line in USAGE[family.arch]]
    lines += ["```python", *usage[:1], 'PATH = "."  # this folder', *usage[1:], "```", "",
              f"The tokenizer puts `{EOT}` (the document separator budgetlm trained with) before every text.", ""]
    if remote:
        lines += [("The modeling code keeps no key/value cache: `generate` recomputes the decoder's tokens at "
                   "each step."), ""]
    return "\n".join(lines)


def _special_ids(arch: str, tokenizer: Tokenizer) -> dict:
    """config.json's token ids: a GPT's documents start and end with the separator; BERT and T5 pad with [PAD], and
    T5's decoder starts from it, as span corruption trained it (train/objectives.py)."""
    eot = eot_id(tokenizer)
    if arch == "gpt":
        return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
    pad = tokenizer.token_to_id(PAD)
    if pad is None:
        raise UserError(f"the {arch} model's tokenizer has no {PAD} token; export the folder pretrain wrote")
    return {"bos_token_id": eot, "pad_token_id": pad, **({"decoder_start_token_id": pad} if arch == "t5" else {})}


def _special_tokens(arch: str) -> dict:
    """tokenizer_config.json's named tokens: the mask of a BERT, the sentinels of a T5."""
    if arch == "gpt":
        return {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT}
    if arch == "bert":
        return {"bos_token": EOT, "pad_token": PAD, "mask_token": MASK, "cls_token": CLS, "sep_token": SEP}
    return {"bos_token": EOT, "pad_token": PAD, "additional_special_tokens": [sentinel(i) for i in range(SENTINELS)]}


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
