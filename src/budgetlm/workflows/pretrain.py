"""`budgetlm pretrain`: train a GPT on a text corpus within a budget and keep the best weights.

setup (budget clock, device, data, tokenizer, model) → fit → save → report, top to bottom."""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from budgetlm.budget import Budget, format_duration, parse_duration
from budgetlm.config import SIZES, RunConfig
from budgetlm.data.default_corpus import default_corpus_files
from budgetlm.data.sources import load_corpus, split_validation
from budgetlm.data.tokenizer import default_vocab_size, load_tokenizer, train_tokenizer
from budgetlm.data.tokens import cache_dir, cached_tokens, content_hash
from budgetlm.errors import UserError
from budgetlm.models.gpt import GPT, GPTConfig
from budgetlm.train.checkpoint import save_model
from budgetlm.train.loop import FitConfig, fit
from budgetlm.train.metrics import RunLog, plot_losses
from budgetlm.train.optim import build_optimizer
from budgetlm.train.runtime import Runtime, can_compile, pick_device, pick_precision, set_threads
from budgetlm.train.schedule import Schedule


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def tokenizer_for(train_docs: list[str], cfg: RunConfig):
    """The user's tokenizer, or BPE trained on the training split (cached by data and size)."""
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    n_bytes = sum(len(d.encode("utf-8")) for d in train_docs)
    vocab = cfg.data.vocab_size or default_vocab_size(n_bytes)
    path = cache_dir() / "tokenizers" / f"bpe{vocab}-{content_hash(train_docs, str(vocab))}.json"
    if path.exists():
        return load_tokenizer(path)
    started = time.monotonic()
    tok = train_tokenizer(train_docs, vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    say(f"trained a {tok.get_vocab_size()}-token BPE tokenizer in {time.monotonic() - started:.1f}s")
    return tok


def model_config(cfg: RunConfig, vocab_size: int) -> GPTConfig:
    m = cfg.model
    n_layer, d_model, n_head = SIZES[m.size or "small"]
    return GPTConfig(
        vocab_size=math.ceil(vocab_size / 64) * 64,  # a multiple of 64 keeps the head's matmul fast
        context=m.context or 256,
        n_layer=m.n_layer or n_layer,
        d_model=m.d_model or d_model,
        n_head=m.n_head or (n_head if not m.d_model else max(1, (m.d_model) // 64)),
        mlp=m.mlp, mlp_ratio=m.mlp_ratio, dropout=m.dropout, logit_softcap=m.logit_softcap,
    )


def default_lr(d_model: int) -> float:
    """Peak AdamW learning rate shrinking with width (µP-like 1/width scaling, anchored at 2e-3 for 256)."""
    return 2e-3 * 256 / d_model


def run(cfg: RunConfig, out: Path, *, quiet: bool = False) -> dict:
    t = cfg.train
    budget = Budget(seconds=parse_duration(t.budget) if t.budget else None, max_steps=t.max_steps,
                    max_tokens=t.max_tokens)  # the clock starts now: data preparation counts
    out.mkdir(parents=True, exist_ok=True)
    threads = set_threads(t.threads)
    torch.manual_seed(t.seed)
    device = pick_device(t.device)
    precision = pick_precision(t.precision, device)

    # Data: documents → train/validation split → tokenizer → cached token streams.
    sources = cfg.data.data or [str(p) for p in default_corpus_files()]
    corpus = load_corpus(sources, text_field=cfg.data.text_field, text_column=cfg.data.text_column)
    if cfg.data.val:
        train_docs = corpus.documents
        val_docs = load_corpus(cfg.data.val, text_field=cfg.data.text_field, text_column=cfg.data.text_column).documents
    else:
        train_docs, val_docs = split_validation(corpus.documents, cfg.data.val_fraction)
    tokenizer = tokenizer_for(train_docs, cfg)
    train_tokens = cached_tokens(train_docs, tokenizer, "train")
    val_tokens = cached_tokens(val_docs, tokenizer, "val")
    val_bytes = sum(len(d.encode("utf-8")) for d in val_docs)

    mc = model_config(cfg, tokenizer.get_vocab_size())
    if len(val_tokens) < mc.context + 1:
        raise UserError(f"the validation text has {len(val_tokens)} tokens, fewer than one context window "
                        f"({mc.context + 1}); give more validation text (--val, --val-fraction) or a smaller --context")
    if len(train_tokens) < 2 * mc.context + 2:
        raise UserError(f"the training text has {len(train_tokens)} tokens, too few for two context windows of "
                        f"{mc.context}; give more text or a smaller --context")

    model = GPT(mc).to(device)
    micro_batch = t.micro_batch or 8
    batch_tokens = t.batch_tokens or micro_batch * mc.context
    micro_steps = max(1, round(batch_tokens / (micro_batch * mc.context)))
    compile_reason = can_compile() if t.compile != "off" else "off"
    compiled = t.compile == "on" or (t.compile == "auto" and device.type == "cuda")
    if compiled and compile_reason:
        say(f"warning: not compiling: {compile_reason}")
        compiled = False
    forward = torch.compile(model) if compiled else model
    runtime = Runtime(device, precision, compiled)

    lr = t.lr or default_lr(mc.d_model)
    optimizer = build_optimizer(model, lr=lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), device=device)
    schedule = Schedule(t.schedule, t.warmup, t.decay_fraction, t.min_lr_ratio)
    eval_steps, eval_s = None, None
    if t.eval_every:
        if t.eval_every.isdigit():
            eval_steps = int(t.eval_every)
        else:
            eval_s = parse_duration(t.eval_every)
    elif budget.seconds:
        eval_s = budget.seconds / 12
    else:
        eval_steps = max(1, (t.max_steps or 1200) // 12)
    eval_batches = None if t.eval_tokens is None else max(1, math.ceil(t.eval_tokens / (micro_batch * mc.context)))
    fit_cfg = FitConfig(lr=lr, schedule=schedule, micro_steps=micro_steps, grad_clip=t.grad_clip,
                        eval_every_steps=eval_steps, eval_every_s=eval_s, eval_batches=eval_batches,
                        patience=t.patience, min_delta=t.min_delta)

    from budgetlm.train.lm import LanguageModelTask
    task = LanguageModelTask(train_tokens, val_tokens, val_bytes, mc.context, micro_batch, device, t.seed)
    task.micro_steps = micro_steps
    say(f"budgetlm pretrain: {model.num_params() / 1e6:.2f}M parameters ({mc.n_layer} layers, d_model {mc.d_model}, "
        f"{mc.n_head} heads, context {mc.context}), vocab {tokenizer.get_vocab_size()}, "
        f"{len(train_tokens):,} training / {len(val_tokens):,} validation tokens")
    say(f"  device {device} ({threads} threads), {precision}, {'compiled' if compiled else 'eager'}, "
        f"batch {micro_steps * micro_batch * mc.context} tokens (micro-batch {micro_batch} × {micro_steps}), "
        f"lr {lr:.2e} {t.schedule}, budget {_describe(budget)}")

    log = RunLog(out / "metrics.jsonl", quiet=quiet)
    result = fit(model, forward, task, optimizer, fit_cfg, budget, runtime, log)

    save_model(out, model, mc.to_dict(), tokenizer)
    summary = {
        "best_val_bpb": result.final["val_bpb"],
        "best_val_loss": result.final["val_loss"],
        "best_step": result.best.get("step"),
        "tokens_seen": result.seen,
        "steps": result.steps,
        "params": model.num_params(),
        "flops_per_token": model.flops_per_token(),
        "wall_s": round(budget.elapsed(), 2),
        "budget_s": budget.seconds,
        "train_s": round(result.train_s, 2),
        "tokens_per_s": round(result.per_s, 1),
        "model_flops_per_s": round(result.per_s * model.flops_per_token(), 1),
        "device": _device_name(device),
        "precision": precision,
        "compiled": compiled,
        "stop_reason": result.stop_reason,
        "epochs": round(result.seen / max(len(train_tokens), 1), 3),
        "config": cfg.to_dict(),
        "model": mc.to_dict(),
    }
    plot_losses(log.records, out / "loss.png", title=f"{mc.n_layer}×{mc.d_model} GPT, {summary['tokens_seen']:,} tokens")
    summary["wall_s"] = round(budget.elapsed(), 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    say(f"done ({result.stop_reason}) in {format_duration(summary['wall_s'])}: best validation {summary['best_val_bpb']:.4f} "
        f"bits/byte (loss {summary['best_val_loss']:.4f}), {summary['tokens_per_s']:,.0f} tokens/s; files in {out}")
    return summary


def _describe(budget: Budget) -> str:
    parts = []
    if budget.seconds:
        parts.append(format_duration(budget.seconds))
    if budget.max_steps:
        parts.append(f"{budget.max_steps} steps")
    if budget.max_tokens:
        parts.append(f"{budget.max_tokens:,} tokens")
    return " / ".join(parts)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
