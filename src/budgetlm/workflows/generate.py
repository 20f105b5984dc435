"""`budgetlm generate`: sample a continuation of a prompt from a trained model; from a T5, fill the sentinels
(<extra_id_0>, <extra_id_1>, ...) of the prompt, or continue it where it has none.

Only the prompt and its continuation go to stdout, so the output can be piped."""

from __future__ import annotations

import math
import sys

import torch

from budgetlm.data.tokenizer import PAD, SENTINELS, eot_id, sentinel
from budgetlm.errors import UserError
from budgetlm.models.sampling import generate, generate_seq2seq
from budgetlm.train.checkpoint import load_language_model
from budgetlm.train.kernels import apply_kernels, cache_dtype
from budgetlm.train.packed import pack_for_inference
from budgetlm.train.runtime import pick_device, pick_precision, precision_dtype, set_threads


def run(model_dir: str, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
        top_k: int | None = 200, top_p: float | None = None, seed: int = 0, device: str = "auto",
        precision: str = "auto", out=None, stream: bool = True) -> str:
    if max_new_tokens < 0:
        raise UserError("--max-new-tokens must be 0 or more")
    if not 0 <= temperature < math.inf:  # also refuses nan
        raise UserError(f"--temperature {temperature}: give 0 (greedy) or a finite number above it")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    out = out or sys.stdout  # looked up per call: a default bound at import keeps whatever stdout was then
    set_threads()
    dev = pick_device(device)
    model, config, tokenizer = load_language_model(model_dir, dev, "generate text (a bert fills masks: budgetlm "
                                                   "fill)", archs=("gpt", "t5"))
    if precision == "auto" and temperature == 0:
        # greedy decoding asks for the one likeliest continuation: bf16 weights round the logits at 3 digits, enough
        # to flip a near-tie and change the text (and to differ from the same model in transformers)
        precision = "fp32"
    precision = pick_precision(precision, dev)
    if precision != "fp32":
        model.cast_weights(precision_dtype(precision))
    apply_kernels(model, dev)
    if config["arch"] == "t5":
        return _fill_sentinels(model, tokenizer, prompt, dev, max_new_tokens, temperature, top_k, top_p, seed, out)
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


def _fill_sentinels(model, tokenizer, prompt: str, dev, max_new_tokens: int, temperature: float, top_k, top_p,
                    seed: int, out) -> str:
    """The prompt with each sentinel replaced by the span the T5 writes for it (a prompt without sentinels gets one
    at its end). The decoder writes `<extra_id_0> span <extra_id_1> span ...` and stops at the sentinel after the
    prompt's last."""
    ids = [eot_id(tokenizer)] + tokenizer.encode(prompt, add_special_tokens=False).ids
    sentinel_ids = [tokenizer.token_to_id(sentinel(i)) for i in range(SENTINELS)]
    if not any(i in sentinel_ids for i in ids):
        prompt, ids = prompt + sentinel(0), ids + [sentinel_ids[0]]
    if len(ids) > model.config.context:
        raise UserError(f"the prompt has {len(ids)} tokens, more than the model's context of {model.config.context}; "
                        "shorten it")
    used = sum(i in sentinel_ids for i in ids)
    generator = torch.Generator(device=dev).manual_seed(seed)
    spans: dict[int, list[int]] = {}
    current = None
    for token in generate_seq2seq(model, torch.tensor([ids], device=dev), tokenizer.token_to_id(PAD),
                                  max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  generator=generator, cache_dtype=cache_dtype(dev, model.embed.weight.dtype)):
        token = int(token[0])
        if token in sentinel_ids:
            current = sentinel_ids.index(token)
            if current >= used:
                break
            spans.setdefault(current, [])
        elif current is not None:
            spans[current].append(token)
    text = prompt
    for i in range(used):
        text = text.replace(sentinel(i), tokenizer.decode(spans.get(i, [])), 1)
    out.write(text + "\n")
    out.flush()
    return text
