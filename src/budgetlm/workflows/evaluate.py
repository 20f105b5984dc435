"""`budgetlm eval`: loss, bits per byte and perplexity of a trained model on any text."""

from __future__ import annotations

import numpy as np
import torch

from budgetlm.data.sources import load_corpus
from budgetlm.data.tokenizer import eot_id
from budgetlm.train.checkpoint import load_language_model
from budgetlm.train.kernels import apply_kernels
from budgetlm.train.lm import evaluate_lm
from budgetlm.train.runtime import autocast, pick_device, pick_precision, set_threads


def run(model_dir: str, data: list[str], *, text_field: str = "text", text_column: str | None = None,
        batch: int = 8, device: str = "auto", precision: str = "auto") -> dict:
    set_threads()
    dev = pick_device(device)
    model, config, tokenizer = load_language_model(model_dir, dev, "be evaluated as a language model")
    apply_kernels(model, dev)
    corpus = load_corpus(data, text_field=text_field, text_column=text_column)
    sep = eot_id(tokenizer)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(corpus.documents, add_special_tokens=False):
        ids.append(sep)
        ids.extend(enc.ids)
    tokens = np.asarray(ids, dtype=np.int64)
    with torch.no_grad(), autocast(dev, pick_precision(precision, dev)):
        metrics = evaluate_lm(model, tokens, corpus.n_bytes, config["context"], batch, dev)
    return {"loss": metrics["val_loss"], "bpb": metrics["val_bpb"], "ppl": metrics["val_ppl"],
            "tokens": metrics["val_tokens"], "bytes": corpus.n_bytes}
