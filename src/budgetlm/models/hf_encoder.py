"""A Hugging Face encoder (BERT, MiniLM, RoBERTa, ...) as a classifier body, loaded offline from a
folder with config.json, weights and a tokenizer. `transformers` is imported only when one is used."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer
from torch import nn

from budgetlm.errors import UserError


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("hf: models need the transformers package: pip install transformers") from None
    return transformers


@contextlib.contextmanager
def _quiet(transformers):
    """No weight-loading progress bar or info messages, and the user's settings restored after."""
    logging = transformers.utils.logging
    bar, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()


class HFEncoder(nn.Module):
    kind = "hf"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.width = model.config.hidden_size
        self.max_length = getattr(model.config, "max_position_embeddings", None)
        self.pad_id = getattr(model.config, "pad_token_id", None) or 0
        self.own_attention = getattr(model.config, "_attn_implementation", None) or "eager"
        # (embedding weight, sequence length) → whether to write attention out; set by the runtime
        self.written_attention: Callable[[torch.Tensor, int], bool] = lambda weight, length: False

    @classmethod
    def from_config(cls, config: dict) -> HFEncoder:
        """The architecture from a saved config dict (randomly initialized; load the weights after)."""
        transformers = _transformers()
        with _quiet(transformers):
            hf_config = transformers.AutoConfig.for_model(**config)
            return cls(transformers.AutoModel.from_config(hf_config))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> HFEncoder:
        transformers = _transformers()
        with _quiet(transformers):
            try:
                model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True)
            except (OSError, ValueError, KeyError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"hf:{folder}: cannot load the encoder ({first})") from None
        return cls(model.float())  # fp32 master weights whatever the checkpoint's dtype

    def config_dict(self) -> dict:
        return self.model.config.to_dict()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._pick_attention(ids)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    def _pick_attention(self, ids: torch.Tensor) -> None:
        """Attention written out ("eager") where the runtime's `written_attention` rule says so (train/kernels.py:
        bf16 on a CPU, short sequences, as the GPT's), else the model's own choice (sdpa). Chosen per call
        because only here is it known whether autocast is on."""
        weight = self.model.get_input_embeddings().weight  # on the inputs' device, in the autocast dtype if on
        want = "eager" if self.written_attention(weight, ids.shape[1]) else self.own_attention
        if want != self.model.config._attn_implementation and hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation(want)  # transformers >= 4.54; older ones keep their own choice

    def token_embedding(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def layers(self) -> list[list[nn.Parameter]]:
        """Embeddings (and whatever else lies outside the stack of layers) first, then each layer.
        The stack is the module list as long as the config's num_hidden_layers."""
        n = getattr(self.model.config, "num_hidden_layers", None)
        stack = next((m for m in self.model.modules() if isinstance(m, nn.ModuleList) and len(m) == n), None)
        if stack is None:
            return [list(self.model.parameters())]
        inside = {id(p) for p in stack.parameters()}
        rest = [p for p in self.model.parameters() if id(p) not in inside]
        return [rest, *[list(layer.parameters()) for layer in stack]]


def load_hf_tokenizer(folder: str | Path) -> Tokenizer:
    """The folder's tokenizer.json, or the fast tokenizer transformers builds from its vocabulary files."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception with the parse error
            raise UserError(f"{path}: not a valid tokenizer.json ({e})") from None
    transformers = _transformers()
    with _quiet(transformers):
        try:
            fast = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"hf:{folder}: no tokenizer.json and no tokenizer transformers can load ({e})") from None
    if not getattr(fast, "is_fast", False):
        raise UserError(f"hf:{folder}: no tokenizer.json and no fast tokenizer for it; save one with "
                        "AutoTokenizer.from_pretrained(...).save_pretrained(folder)")
    return fast.backend_tokenizer


def load_hf_encoder(folder: str | Path) -> tuple[HFEncoder, Tokenizer]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"hf:{folder}: no such folder; give a Hugging Face model folder (config.json, weights, tokenizer)")
    if not (folder / "config.json").is_file():
        inside = sorted(p.parent for p in folder.glob("*/config.json"))
        hint = f" (one is inside: hf:{inside[0]})" if inside else ""
        raise UserError(f"hf:{folder}: no config.json; give a Hugging Face model folder{hint}")
    return HFEncoder.from_pretrained(folder), load_hf_tokenizer(folder)
