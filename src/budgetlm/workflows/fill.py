"""`budgetlm fill`: the likeliest tokens for each [MASK] of a text, from a masked language model (--arch bert).

Prints one line per mask with its top predictions and probabilities, then the text with each mask replaced by
its top prediction (quoted where that is only whitespace, as a newline)."""

from __future__ import annotations

import sys

import torch

from budgetlm.data.tokenizer import MASK, eot_id
from budgetlm.errors import UserError
from budgetlm.train.checkpoint import load_language_model
from budgetlm.train.runtime import pick_device, set_threads


def run(model_dir: str, text: str, *, top_k: int = 5, device: str = "auto", out=None) -> list[list[tuple[str, float]]]:
    """For each [MASK] in `text`, its `top_k` (token, probability) pairs, best first."""
    if top_k < 1:
        raise UserError("--top-k must be 1 or more")
    out = out or sys.stdout
    set_threads()
    dev = pick_device(device)
    model, _, tokenizer = load_language_model(model_dir, dev, "fill masks (a gpt or t5 generates: budgetlm generate)",
                                              archs=("bert",))
    mask_id = tokenizer.token_to_id(MASK)
    ids = [eot_id(tokenizer)] + tokenizer.encode(text, add_special_tokens=False).ids  # as every training document
    masks = [i for i, t in enumerate(ids) if t == mask_id]
    if not masks:
        raise UserError(f"--text has no {MASK}; put {MASK} where a token is to be predicted")
    if len(ids) > model.config.context:
        raise UserError(f"--text has {len(ids)} tokens, more than the model's context of {model.config.context}; "
                        "shorten it")
    with torch.inference_mode():
        h = model.hidden(torch.tensor([ids], device=dev))[0, masks]
        probs = model.logits(h).float().softmax(-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    predictions = [[(tokenizer.decode([int(t)]), float(p)) for p, t in zip(ps, ts)]
                   for ps, ts in zip(top.values, top.indices)]
    for n, options in enumerate(predictions, 1):
        out.write(f"{MASK} {n}: " + "  ".join(f"{token!r} {p:.3f}" for token, p in options) + "\n")
    filled = text
    for options in predictions:
        # the text around a mask keeps its own spaces; a prediction that is only whitespace is shown quoted
        filled = filled.replace(MASK, options[0][0].strip() or repr(options[0][0]), 1)
    out.write(filled + "\n")
    out.flush()
    return predictions
