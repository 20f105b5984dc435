"""`budgetlm export`: a trained model folder written as a Hugging Face transformers folder."""

from __future__ import annotations

import json
from pathlib import Path

from budgetlm.errors import UserError
from budgetlm.export import hf
from budgetlm.report import prepare_out, say
from budgetlm.train.checkpoint import load_model, read_config

FORMATS = ("hf",)


def run(model_dir: str, out: Path, *, format: str = "hf") -> Path:
    if format not in FORMATS:
        raise UserError(f"--format {format!r} is not known; use one of: {', '.join(FORMATS)}")
    folder = Path(model_dir)
    if out.resolve() == folder.resolve():
        raise UserError("--out is the model folder itself, whose config.json it would overwrite; choose another --out")
    hf.family_for_export(read_config(folder))  # refuse before loading weights or touching --out
    model, config, tokenizer = load_model(folder)
    if tokenizer is None:
        raise UserError(f"{folder}: no tokenizer.json beside the model")
    summary_path = folder / "summary.json"
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    except json.JSONDecodeError as e:
        raise UserError(f"{summary_path}: not valid JSON ({e.msg}); remove it to export without the run's "
                        "figures") from None
    prepare_out(out)
    family = hf.write(out, model, config, tokenizer, summary, source=str(folder.resolve()))
    remote = ", trust_remote_code=True" if family.code_files else ""
    say(f"exported as {family.architecture} ({family.model_type}) to {out}; load it with "
        f"{family.auto_class}.from_pretrained({str(out)!r}{remote})")
    return out
