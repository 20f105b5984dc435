"""`budgetlm eval`: loss, bits per byte and perplexity of a trained model on any text.

The text streams through: read in pieces, encoded a group at a time, scored a batch of windows at a
time, so memory does not grow with the text."""

from __future__ import annotations

import torch

from budgetlm.data.sources import empty_corpus, iter_pieces, warn_skipped
from budgetlm.data.tokens import stream_tokens, stream_windows
from budgetlm.errors import UserError
from budgetlm.train.checkpoint import load_language_model
from budgetlm.train.kernels import apply_kernels
from budgetlm.train.lm import lm_metrics, sum_nats
from budgetlm.train.runtime import autocast, pick_device, pick_precision, set_threads


def run(model_dir: str, data: list[str], *, text_field: str = "text", text_column: str | None = None,
        batch: int = 8, device: str = "auto", precision: str = "auto") -> dict:
    set_threads()
    dev = pick_device(device)
    model, config, tokenizer = load_language_model(model_dir, dev, "be evaluated as a language model")
    apply_kernels(model, dev)
    skipped: list[str] = []
    n_bytes = 0

    def chunks():
        nonlocal n_bytes
        pieces = iter_pieces(data, text_field=text_field, text_column=text_column, skipped=skipped)
        for ids, size in stream_tokens(pieces, tokenizer):
            n_bytes += size
            yield ids

    with torch.no_grad(), autocast(dev, pick_precision(precision, dev)):
        total_nats, total_tokens = sum_nats(model, stream_windows(chunks(), config["context"], batch), dev)
    warn_skipped(skipped)
    if not total_tokens:
        raise UserError(empty_corpus(data, skipped))
    metrics = lm_metrics(total_nats, total_tokens, n_bytes)
    return {"loss": metrics["val_loss"], "bpb": metrics["val_bpb"], "ppl": metrics["val_ppl"],
            "tokens": metrics["val_tokens"], "bytes": n_bytes}
