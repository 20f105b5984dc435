"""`budgetlm generate`: sample a continuation of a prompt from a trained model.

Only the prompt and its continuation go to stdout, so the output can be piped."""

from __future__ import annotations

import sys

import torch

from budgetlm.data.tokenizer import eot_id
from budgetlm.errors import UserError
from budgetlm.models.sampling import generate
from budgetlm.train.checkpoint import load_language_model
from budgetlm.train.kernels import apply_kernels, cache_dtype
from budgetlm.train.packed import pack_for_inference
from budgetlm.train.runtime import pick_device, pick_precision, precision_dtype, set_threads


def run(model_dir: str, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
        top_k: int | None = 200, top_p: float | None = None, seed: int = 0, device: str = "auto",
        precision: str = "auto", out=sys.stdout, stream: bool = True) -> str:
    if max_new_tokens < 0:
        raise UserError("--max-new-tokens must be 0 or more")
    if temperature < 0:
        raise UserError("--temperature must be 0 (greedy) or more")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    set_threads()
    dev = pick_device(device)
    model, _, tokenizer = load_language_model(model_dir, dev, "generate text")
    precision = pick_precision(precision, dev)
    if precision != "fp32":
        model.cast_weights(precision_dtype(precision))
    apply_kernels(model, dev)
    pack_for_inference(model)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
    ids = [eot_id(tokenizer)] + ids  # the document separator starts every training document
    generator = torch.Generator(device=dev).manual_seed(seed)
    prompt_ids = torch.tensor([ids], device=dev)
    out.write(prompt)
    new: list[int] = []
    shown = ""
    for token in generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, generator=generator, cache_dtype=cache_dtype(dev, model.embed.weight.dtype)):
        new.append(int(token[0]))
        text = tokenizer.decode(new)
        # byte-level BPE can end mid-character; print only whole characters as they complete
        if stream and not text.endswith("\ufffd"):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = tokenizer.decode(new)
    out.write(text[len(shown):] + "\n")
    out.flush()
    return prompt + text
