"""Saving and loading a trained model folder: model.safetensors + config.json + tokenizer.json.

Weights only through safetensors and metadata only through JSON: nothing is ever unpickled."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from budgetlm.errors import UserError
from budgetlm.models.registry import build


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    # safetensors refuses shared storage (the tied embedding is one tensor already) and views
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    except SafetensorError as e:  # a full disk surfaces here as a SafetensorError, not an OSError
        tmp.unlink(missing_ok=True)
        raise OSError(str(e).split(": ", 1)[-1]) from None
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model(out: Path, model: nn.Module, model_config: dict, tokenizer: Tokenizer | None, extra: dict | None = None,
               *, state: dict[str, torch.Tensor] | None = None) -> None:
    """`state`: the weights to write in place of the model's own (gathered whole from sharded processes)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_weights(state if state is not None else model.state_dict(), out / "model.safetensors")
        meta = {**model_config, **(extra or {})}
        atomic_write_bytes(out / "config.json", json.dumps(meta, indent=2).encode())
        if tokenizer is not None:
            atomic_write_bytes(out / "tokenizer.json", tokenizer.to_str().encode())
    except OSError as e:
        raise UserError(f"could not save the model in {out} ({e.strerror or e}); free space or choose another "
                        "--out") from None


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: not a budgetlm model folder (no config.json); give the --out folder of a run")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg})") from None


def load_model(folder: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict, Tokenizer | None]:
    """(model in eval mode, its config, its tokenizer or None)."""
    folder = Path(folder)
    config = read_config(folder)
    model = build(config)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{folder}: no model.safetensors")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights}: unreadable or corrupted weights ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise UserError(f"{weights}: weights do not match config.json ({first})") from None
    tok_path = folder / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tok_path)) if tok_path.is_file() else None
    return model.to(device).eval(), config, tokenizer


def load_language_model(folder: str | Path, device: torch.device, purpose: str,
                        archs: tuple[str, ...] = ("gpt",)) -> tuple[nn.Module, dict, Tokenizer]:
    """A pretrained model of one of `archs` and its tokenizer; `purpose` completes "a <arch> model cannot ..." errors."""
    model, config, tokenizer = load_model(folder, device)
    if config.get("arch") not in archs:
        raise UserError(f"{folder}: a {config.get('arch')} model cannot {purpose}; give a budgetlm pretrain folder")
    if tokenizer is None:
        raise UserError(f"{folder}: no tokenizer.json beside the model")
    return model, config, tokenizer
