"""`budgetlm eval`: loss, bits per byte and perplexity of a trained model on any text.

The text streams through: read in pieces, encoded a group at a time, scored a batch of windows at a
time, so memory does not grow with the text."""

from __future__ import annotations

import os
import time

import torch

from budgetlm.budget import format_duration
from budgetlm.data.sources import TEXT_SUFFIXES, empty_corpus, expand, iter_pieces, warn_skipped
from budgetlm.data.tokens import stream_tokens, stream_windows
from budgetlm.errors import UserError
from budgetlm.report import say
from budgetlm.train.checkpoint import load_language_model
from budgetlm.train.kernels import apply_kernels
from budgetlm.train.lm import lm_metrics, sum_nats
from budgetlm.train.runtime import autocast, pick_device, pick_precision, set_threads

PROGRESS_EVERY_S = 10.0


def run(model_dir: str, data: list[str], *, text_field: str = "text", text_column: str | None = None,
        batch: int = 8, device: str = "auto", precision: str = "auto") -> dict:
    set_threads()
    dev = pick_device(device)
    model, config, tokenizer = load_language_model(model_dir, dev, "be evaluated as a language model")
    apply_kernels(model, dev)
    skipped: list[str] = []
    n_bytes = 0
    files = [f for spec in data for f in expand(spec)]
    plain = files and all(f.suffix.lower() in TEXT_SUFFIXES for f in files)  # a table's text is not its file size
    total = sum(os.path.getsize(f) for f in files) if plain else 0
    started = last_said = time.monotonic()

    def chunks():
        nonlocal n_bytes, last_said
        pieces = iter_pieces(data, text_field=text_field, text_column=text_column, skipped=skipped)
        for ids, size in stream_tokens(pieces, tokenizer):
            n_bytes += size
            now = time.monotonic()
            if now - last_said >= PROGRESS_EVERY_S:  # a large text takes minutes: say how far it is
                last_said = now
                rate = n_bytes / (now - started)
                left = f", about {format_duration((total - n_bytes) / rate)} left" if total > n_bytes else ""
                say(f"eval: {n_bytes / 2**20:,.0f} of {total / 2**20:,.0f} MB read, {rate / 2**20:.2f} MB/s{left}"
                    if total else f"eval: {n_bytes / 2**20:,.0f} MB read, {rate / 2**20:.2f} MB/s")
            yield ids

    with torch.no_grad(), autocast(dev, pick_precision(precision, dev)):
        total_nats, total_tokens = sum_nats(model, stream_windows(chunks(), config["context"], batch), dev)
    warn_skipped(skipped)
    if not total_tokens:
        raise UserError(empty_corpus(data, skipped))
    metrics = lm_metrics(total_nats, total_tokens, n_bytes)
    return {"loss": metrics["val_loss"], "bpb": metrics["val_bpb"], "ppl": metrics["val_ppl"],
            "tokens": metrics["val_tokens"], "bytes": n_bytes}
