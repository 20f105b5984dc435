"""`budgetlm predict`: labels and class probabilities from a `budgetlm finetune` folder, for texts
given on the command line or read from a file, in input order."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from budgetlm.data.labelled import LABELLED_SUFFIXES, find_text_column, read_rows
from budgetlm.errors import UserError
from budgetlm.train.checkpoint import atomic_write_bytes, load_model, read_config
from budgetlm.train.classify import (
    EVAL_BATCH,
    classification_tokenizer,
    encode_texts,
    predict_probs,
)
from budgetlm.train.runtime import pick_device, set_threads


def load_classifier(folder: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict, Tokenizer]:
    """(classifier in eval mode, its config, its tokenizer set up as in training)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--model {folder}: no such folder; give the --out folder of budgetlm finetune")
    arch = read_config(folder).get("arch")
    if arch != "classifier":
        raise UserError(f"--model {folder}: holds a {arch!r} model, not a classifier; give the --out folder of "
                        "budgetlm finetune")
    model, config, tok = load_model(folder, device)
    if tok is None:
        raise UserError(f"{folder}: no tokenizer.json; give the --out folder of budgetlm finetune")
    return model, config, classification_tokenizer(tok, config["max_length"])


def predict(model: nn.Module, config: dict, tok: Tokenizer, texts: list[str],
            device: torch.device | str = "cpu") -> list[dict]:
    """One {"label", "probs"} per text: the label as written in the training data (a JSON 1 stays a
    number), the probabilities keyed by the labels' text."""
    if not texts:
        return []
    labels = config["labels"]
    written = config.get("label_values") or labels
    probs = predict_probs(model, encode_texts(tok, texts), EVAL_BATCH, torch.device(device), model.pad_id)
    return [{"label": written[int(p.argmax())], "probs": {label: round(float(v), 6) for label, v in zip(labels, p)}}
            for p in probs]


def read_texts(path: str | Path, text_column: str | None, trained_on: str | None = None,
               header: bool = True) -> list[str]:
    """The texts of a .txt file (one per line) or of a table's column (as labelled.find_text_column finds it)."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise UserError(f"{path}: no such file; check the path")
        try:
            return path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text; convert it to UTF-8") from None
    if path.suffix.lower() not in LABELLED_SUFFIXES:
        raise UserError(f"{path}: give a .txt file (one text per line) or a {', '.join(LABELLED_SUFFIXES)} table")
    columns, rows = read_rows(path, header)
    text_column = find_text_column(path, columns, rows, text_column, trained_on)
    return ["" if row.get(text_column) is None else str(row[text_column]) for row in rows]


def run(model_dir: str | Path, *, texts: list[str] | None = None, data: str | Path | None = None,
        text_column: str | None = None, header: bool = True, out: str | Path | None = None, device: str = "auto",
        threads: int | None = None) -> list[dict]:
    if bool(texts) == (data is not None):
        raise UserError("give either --text or --data (a .txt file or a table) to predict")
    set_threads(threads)
    dev = pick_device(device)
    model, config, tok = load_classifier(model_dir, dev)
    if data is not None:
        texts = read_texts(data, text_column, config.get("text_column"), header)
    predictions = predict(model, config, tok, texts, dev)
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    if out is None:
        sys.stdout.write(lines)
    else:
        out = Path(out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out, lines.encode("utf-8"))
        except OSError as e:
            raise UserError(f"cannot write {out} ({e.strerror or e}); choose another --out") from None
        print(f"predict: {len(predictions)} predictions in {out}", file=sys.stderr)
    return predictions
