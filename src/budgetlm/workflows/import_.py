"""`budgetlm import`: a Hugging Face transformers folder of a family budgetlm exports, as a budgetlm model folder
that generate, eval and finetune --model read."""

from __future__ import annotations

from pathlib import Path

from budgetlm.errors import UserError
from budgetlm.export import hf
from budgetlm.models.registry import build
from budgetlm.report import prepare_out, say
from budgetlm.train.checkpoint import save_model


def run(source: str, out: Path) -> Path:
    if not source.startswith("hf:"):
        raise UserError(f"--from {source!r}: give hf:PATH, a folder saved by transformers or budgetlm export")
    folder = Path(source[3:])
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (import reads local folders; download a Hub model first)")
    if out.resolve() == folder.resolve():
        raise UserError("--out is the folder being imported, whose config.json it would overwrite; choose another "
                        "--out")
    config, state, tokenizer = hf.read(folder)
    model = build(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise UserError(f"{folder}: weights do not match its config.json ({first})") from None
    prepare_out(out)
    save_model(out, model, config, tokenizer)
    say(f"imported {folder} as a budgetlm {config['arch']} model to {out}")
    return out
