"""`budgetlm pretrain`: train a GPT on a text corpus within a budget and keep the best weights.

setup (budget clock, device, data, tokenizer, model) → fit → save → report, top to bottom."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from pathlib import Path

import torch

from budgetlm.budget import Budget, format_duration, parse_duration
from budgetlm.config import SIZES, RunConfig
from budgetlm.data.default_corpus import default_corpus_files
from budgetlm.data.sources import load_corpus, split_validation
from budgetlm.data.tokenizer import default_vocab_size, load_tokenizer, train_tokenizer
from budgetlm.data.tokens import bpe_dropout_tokens, cache_dir, cached_tokens, content_hash, supports_bpe_dropout
from budgetlm.errors import UserError
from budgetlm.models.gpt import GPT, GPTConfig
from budgetlm.report import prepare_out, say, say_done
from budgetlm.plan import Plan, bpe_passes, context_for, plan
from budgetlm.train.batching import largest_micro_batch
from budgetlm.train.checkpoint import atomic_write_bytes, save_model
from budgetlm.train.lm import LanguageModelTask
from budgetlm.train.loop import FitConfig, fit
from budgetlm.train.metrics import RunLog, plot_losses
from budgetlm.train.optim import build_optimizer, parse_optim_args
from budgetlm.train.resume import Checkpoints, find_resume
from budgetlm.train.runtime import (
    Runtime,
    pick_device,
    pick_precision,
    setup_cpu,
    should_compile,
)
from budgetlm.train.schedule import Schedule
from budgetlm.train.signals import GracefulStop


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


def given_or_planned(given, planned: Plan | None, field: str, off):
    """A setting the plan may choose: the flag where given, else the plan's, else `off` (no plan)."""
    if given is not None:
        return given
    return getattr(planned, field) if planned else off


def model_config(cfg: RunConfig, vocab_size: int, planned: Plan | None) -> GPTConfig:
    """Explicit flags first, then the size preset, then the plan, then the `small` preset."""
    m = cfg.model
    if m.size:
        n_layer, d_model, n_head = SIZES[m.size]
    elif planned is not None:
        n_layer, d_model, n_head = planned.n_layer, planned.d_model, planned.n_head
    else:
        n_layer, d_model, n_head = SIZES["small"]
    d_model = m.d_model or d_model
    return GPTConfig(
        vocab_size=math.ceil(vocab_size / 64) * 64,  # a multiple of 64 keeps the head's matmul fast
        context=m.context or (planned.context if planned else context_for(d_model)),
        n_layer=m.n_layer or n_layer,
        d_model=d_model,
        n_head=m.n_head or (n_head if not m.d_model else max(1, d_model // 64)),
        mlp=m.mlp, mlp_ratio=m.mlp_ratio, logit_softcap=m.logit_softcap,
        canon=given_or_planned(m.canon, planned, "canon", 0),
        dropout=given_or_planned(m.dropout, planned, "dropout", 0.0),
        attention_dropout=m.attention_dropout,
    )


def saved_plan(meta: dict) -> Plan | None:
    """The plan a checkpoint's run was made with, or None (checkpoints from before plans were kept)."""
    known = {f.name for f in dataclasses.fields(Plan)}
    try:
        return Plan(**{k: v for k, v in (meta.get("plan") or {}).items() if k in known})
    except TypeError:
        return None


def bpe_dropout_setting(cfg: RunConfig, tokenizer, planned: Plan | None) -> tuple[float, int]:
    """(rate, noisy passes) of BPE-dropout: the flags, else the plan; (0, 0) when off."""
    d = cfg.data
    rate = given_or_planned(d.bpe_dropout, planned, "bpe_dropout", 0.0)
    if not rate:
        return 0.0, 0
    if not supports_bpe_dropout(tokenizer):
        if d.bpe_dropout:
            raise UserError("--bpe-dropout needs a BPE tokenizer, and --tokenizer gave another kind; "
                            "drop --bpe-dropout or use a BPE tokenizer")
        return 0.0, 0
    return rate, d.bpe_passes or bpe_passes(planned.expected_epochs if planned else None)


# Peak learning rate of each optimizer relative to AdamW's (Muon's update is matched to AdamW's RMS).
LR_RELATIVE_TO_ADAMW = {"adamw": 1.0, "adam": 1.0, "muon": 1.0, "rmsprop": 0.5, "lamb": 5.0, "adafactor": 5.0,
                        "sgd": 100.0}


def default_lr(d_model: int, optim: str = "adamw") -> float:
    """Peak learning rate shrinking with width (µP-like 1/width scaling, AdamW anchored at 1.5e-3 for d_model 256)."""
    return 1.5e-3 * 256 / d_model * LR_RELATIVE_TO_ADAMW[optim]


def parse_every(text: str | None) -> tuple[int | None, float | None]:
    """"100" → every 100 steps; "30s" → every 30 seconds."""
    if not text:
        return None, None
    if text.strip().isdigit():
        if int(text) < 1:
            raise UserError(f"an interval of {text} steps must be at least 1")
        return int(text), None
    return None, parse_duration(text)


def parse_early_stop(text: str | None, patience: int, min_delta: float) -> tuple[str, int, float]:
    """"val_bpb,3,0.001" → (metric, patience, min_delta); without it, val_loss with --patience."""
    if not text:
        return "val_loss", patience, min_delta
    parts = [p.strip() for p in text.split(",")]
    try:
        if not 2 <= len(parts) <= 3:
            raise ValueError
        return parts[0], int(parts[1]), float(parts[2]) if len(parts) == 3 else 0.0
    except ValueError:
        raise UserError(f"--early-stop {text!r}: write metric,patience[,min_delta], e.g. val_bpb,3,0.001") from None


HIGHER_IS_BETTER = {"val_accuracy", "val_macro_f1"}
# Time the temperature's fit takes, in evaluations of the whole validation text, the final evaluation included:
# measured 1.4 on the default corpus' and 1.8 on tinyshakespeare's (a small text, where the fixed cost of the fit
# shows; the reserve's 2 s of slack covers it)
CALIBRATION_EVALS = 1.5


def run(cfg: RunConfig, out: Path, *, quiet: bool = False, on_eval=None) -> dict:
    """Train, save the best weights and the run's files in `out`; return the summary.
    `on_eval(entry) -> bool` sees each periodic evaluation and may stop the run (see loop.fit)."""
    t = cfg.train
    budget = Budget(seconds=parse_duration(t.budget) if t.budget else None, max_steps=t.max_steps,
                    max_tokens=t.max_tokens)  # the clock starts now: data preparation counts
    prepare_out(out)
    checkpoints = Checkpoints(out / "checkpoints", keep=t.keep_checkpoints)
    snapshot = find_resume(t.resume, out, needs=("tokenizer.json",), warn=say)
    if snapshot is not None:
        budget.spent_s = snapshot.meta["spent_s"]
    threads = setup_cpu(t.threads)
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
    # a resumed run keeps the tokenizer it started with
    tokenizer = load_tokenizer(out / "tokenizer.json") if snapshot is not None else tokenizer_for(train_docs, cfg)
    train_tokens = cached_tokens(train_docs, tokenizer, "train")
    val_tokens = cached_tokens(val_docs, tokenizer, "val")
    val_bytes = sum(len(d.encode("utf-8")) for d in val_docs)

    planned = None
    if budget.seconds and not (cfg.model.size or cfg.model.n_layer or cfg.model.d_model or cfg.model.n_head):
        # a resumed run keeps the plan its first session made for the whole budget; planning again
        # for the time left could pick another shape, which the checkpoint cannot continue
        planned = saved_plan(snapshot.meta) if snapshot is not None else None
        if planned is None:
            planned = plan(budget.seconds - budget.elapsed(), train_tokens=len(train_tokens),
                           vocab=tokenizer.get_vocab_size(), device=device, precision=precision,
                           micro_batch=t.micro_batch)
        say(planned.describe())
    mc = model_config(cfg, tokenizer.get_vocab_size(), planned)
    if mc.d_model % mc.n_head:
        raise UserError(f"--d-model {mc.d_model} is not divisible by --n-head {mc.n_head}; choose sizes that divide")
    if mc.canon == 1:
        raise UserError("--canon 1 would mix a position with itself only; give 0 (off) or a kernel of 2 or more")
    if len(val_tokens) < mc.context + 1:
        raise UserError(f"the validation text has {len(val_tokens)} tokens, fewer than one context window "
                        f"({mc.context + 1}); give more validation text (--val, --val-fraction) or a smaller --context")
    if len(train_tokens) < 2 * mc.context + 2:
        raise UserError(f"the training text has {len(train_tokens)} tokens, too few for two context windows of "
                        f"{mc.context}; give more text or a smaller --context")
    bpe_rate, passes = bpe_dropout_setting(cfg, tokenizer, planned)
    identity = {"model": mc.to_dict(), "train_tokens": Path(train_tokens.filename).name,
                "vocab_asked": cfg.data.vocab_size, "bpe_dropout": bpe_rate, "bpe_passes": passes,
                "plan": dataclasses.asdict(planned) if planned is not None else None}
    if snapshot is not None:
        _check_same_run(snapshot, identity)
    text_tokens = len(train_tokens)
    if bpe_rate:
        started = time.monotonic()
        train_tokens, drawn = bpe_dropout_tokens(train_docs, tokenizer, train_tokens, bpe_rate, passes, t.seed)
        if drawn:
            if snapshot is not None:
                say("the BPE-dropout segmentations this run started with are no longer cached: drew new ones, so "
                    "the resumed run reads other segmentations of the same text")
            say(f"re-segmented the training text {passes} times with BPE-dropout {bpe_rate:g} in "
                f"{time.monotonic() - started:.1f}s")

    model = GPT(mc).to(device)
    asked_tokens = parse_count(t.batch_tokens, "--batch-tokens", "tokens") if t.batch_tokens else None
    if asked_tokens is not None:
        batch_tokens = asked_tokens
    elif planned is not None and mc.context == planned.context:
        batch_tokens = planned.batch_tokens
    else:
        batch_tokens = (t.micro_batch or 8) * mc.context
    compiled = should_compile(t.compile, device, budget.seconds)
    forward = torch.compile(model) if compiled else model
    runtime = Runtime(device, precision, compiled)
    if t.micro_batch:
        micro_batch = t.micro_batch
    elif t.batch_tokens == "auto":
        micro_batch = largest_micro_batch(model, forward, mc.context, mc.vocab_size, batch_tokens, device,
                                          runtime.autocast)
    else:
        micro_batch = planned.micro_batch if planned else 8
        if asked_tokens is not None:  # a batch smaller than one planned micro-batch: fewer sequences per pass
            micro_batch = max(1, min(micro_batch, asked_tokens // mc.context))
    micro_steps = max(1, round(batch_tokens / (micro_batch * mc.context)))
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    lr = t.lr or default_lr(mc.d_model, t.optim)
    optimizer = build_optimizer(model, t.optim, lr=lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2),
                                extra=parse_optim_args(t.optim_args or ""), device=device)
    schedule = Schedule(t.schedule, t.warmup, t.decay_fraction, t.min_lr_ratio, gamma=t.gamma,
                        step_size=t.step_size, patience=t.plateau_patience)
    eval_steps, eval_s = parse_every(t.eval_every)
    if not (eval_steps or eval_s):
        if budget.seconds:
            eval_s = budget.seconds / 12
        else:
            eval_steps = max(1, (t.max_steps or 1200) // 12)
    save_steps, save_s = parse_every(t.save_every)
    monitor, patience, min_delta = parse_early_stop(t.early_stop, t.patience, t.min_delta)
    eval_batches = None if t.eval_tokens is None else max(1, math.ceil(t.eval_tokens / (micro_batch * mc.context)))
    fit_cfg = FitConfig(lr=lr, schedule=schedule, micro_steps=micro_steps, grad_clip=t.grad_clip,
                        schedule_clock=t.schedule_clock, eval_every_steps=eval_steps, eval_every_s=eval_s,
                        eval_batches=eval_batches, monitor=monitor,
                        monitor_mode="max" if monitor in HIGHER_IS_BETTER else "min", patience=patience,
                        min_delta=min_delta, save_every_steps=save_steps, save_every_s=save_s, l1=t.l1,
                        ema=given_or_planned(t.ema, planned, "ema", 0.0),
                        final_eval=not t.calibrate, reserve_evals=CALIBRATION_EVALS if t.calibrate else 1)

    task = LanguageModelTask(train_tokens, val_tokens, val_bytes, mc.context, micro_batch, device, t.seed,
                             label_smoothing=t.label_smoothing)
    task.micro_steps = micro_steps
    if monitor not in ("val_loss", "val_bpb", "val_ppl"):
        raise UserError(f"--early-stop: pretraining measures val_loss, val_bpb and val_ppl, not {monitor!r}")
    if snapshot is not None:
        fit_cfg.micro_steps = snapshot.meta.get("micro_steps", micro_steps)
        say(f"resuming from {snapshot.path} (step {snapshot.meta['loop']['step']}, "
            f"{format_duration(snapshot.meta['spent_s'])} of the budget spent)")
    else:
        # the tokenizer and config go out first: a resume must find them whatever happens next
        atomic_write_bytes(out / "tokenizer.json", tokenizer.to_str().encode())
        atomic_write_bytes(out / "config.json", json.dumps(mc.to_dict(), indent=2).encode())
    say(f"budgetlm pretrain: {model.num_params() / 1e6:.2f}M parameters ({mc.n_layer} layers, d_model {mc.d_model}, "
        f"{mc.n_head} heads, context {mc.context}), vocab {tokenizer.get_vocab_size()}, "
        f"{text_tokens:,} training / {len(val_tokens):,} validation tokens")
    say(f"  device {device} ({threads} threads), {precision}, {'compiled' if compiled else 'eager'}, "
        f"batch {micro_steps * micro_batch * mc.context} tokens (micro-batch {micro_batch} × {micro_steps}), "
        f"{t.optim} lr {lr:.2e} {t.schedule}, budget {budget.describe()}")

    log = RunLog(out / "metrics.jsonl", quiet=quiet,
                 resume_step=snapshot.meta["loop"]["step"] if snapshot is not None else None)
    with GracefulStop() as stop:  # a signal after training, too, waits until the model is saved
        result = fit(model, forward, task, optimizer, fit_cfg, budget, runtime, log, checkpoints=checkpoints,
                     resume=snapshot, stop=stop, scaler=scaler,
                     run_meta={**identity, "micro_steps": fit_cfg.micro_steps}, on_eval=on_eval)
        raw = {"val_bpb": result.final["val_bpb"], "val_loss": result.final["val_loss"]}
        best = raw
        if t.calibrate and result.stop_reason != "interrupted":
            model.eval()
            with torch.no_grad(), runtime.autocast():
                calibration = task.calibrate(model)  # also the final evaluation at temperature 1
            raw = best = {"val_bpb": calibration.raw_val_bpb, "val_loss": calibration.raw_val_loss}
            if calibration.val_bpb < calibration.raw_val_bpb:  # cross-fitted: on positions the fit did not see
                mc.temperature = calibration.temperature
                best = {"val_bpb": calibration.val_bpb, "val_loss": calibration.val_loss}
            # the final evaluation, with the figure reported: the curve in metrics.jsonl ends where the summary does
            log.record(kind="final", step=result.steps, tokens=result.seen, elapsed_s=budget.elapsed(),
                       best_step=result.best.get("step"), **best, val_tokens=len(val_tokens) - 1, val_full=True,
                       uncalibrated_val_bpb=raw["val_bpb"], temperature=mc.temperature)
        save_model(out, model, mc.to_dict(), tokenizer)
    summary = {
        "best_val_bpb": best["val_bpb"],
        "best_val_loss": best["val_loss"],
        "temperature": mc.temperature,
        "uncalibrated_val_bpb": raw["val_bpb"],
        "best_step": result.best.get("step"),
        "tokens_seen": result.seen,
        "steps": result.steps,
        "params": model.num_params(),
        "flops_per_token": model.flops_per_token(),
        "wall_s": round(budget.elapsed(), 2),
        "budget_s": budget.seconds,
        "train_s": round(result.train_s, 2),
        # steady state: the first steps of a session (compilation, warm-up) are left out, as in the
        # peer benchmarks; tokens_per_s_overall counts every step
        "tokens_per_s": round(result.per_s, 1),
        "tokens_per_s_overall": round(result.overall_per_s, 1),
        "model_flops_per_s": round(result.per_s * model.flops_per_token(), 1),
        "device": _device_name(device),
        "precision": precision,
        "compiled": compiled,
        "ema": fit_cfg.ema,
        "stop_reason": result.stop_reason,
        "skipped_steps": result.state.skipped_steps,
        "epochs": round(result.seen / max(text_tokens, 1), 3),  # of the text, however segmented
        "bpe_dropout": bpe_rate,
        "bpe_passes": passes,
        "config": cfg.to_dict(),
        "model": mc.to_dict(),
    }
    plot_losses(log.records, out / "loss.png", title=f"{mc.n_layer}×{mc.d_model} GPT, {summary['tokens_seen']:,} tokens")
    summary["wall_s"] = round(budget.elapsed(), 2)
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    calibrated = (f", at temperature {mc.temperature:.3f}; {summary['uncalibrated_val_bpb']:.4f} at 1"
                  if mc.temperature != 1 else "")
    say_done(result, out, f"best validation {summary['best_val_bpb']:.4f} bits/byte (loss "
             f"{summary['best_val_loss']:.4f}{calibrated}), {summary['tokens_per_s']:,.0f} tokens/s", summary["wall_s"])
    return summary


def _check_same_run(snapshot, identity: dict) -> None:
    saved = snapshot.meta.get("model")
    if saved != identity["model"]:
        diff = {k: (saved.get(k) if saved else None, v) for k, v in identity["model"].items()
                if not saved or saved.get(k) != v}
        raise UserError(f"checkpoint {snapshot.path} belongs to another model (checkpoint vs now: {diff}); "
                        "resume with the same model flags or start a new --out")
    asked = snapshot.meta.get("vocab_asked")
    if identity["vocab_asked"] and asked != identity["vocab_asked"]:
        raise UserError(f"checkpoint {snapshot.path} was trained with a tokenizer of "
                        f"{'--vocab-size ' + str(asked) if asked else 'the default vocabulary size'}, not --vocab-size "
                        f"{identity['vocab_asked']}; resume with the same --vocab-size or start a new --out")
    saved_bpe = (snapshot.meta.get("bpe_dropout", 0.0), snapshot.meta.get("bpe_passes", 0))
    if saved_bpe != (identity["bpe_dropout"], identity["bpe_passes"]):
        raise UserError(f"checkpoint {snapshot.path} was trained with BPE-dropout {saved_bpe[0]:g} over "
                        f"{saved_bpe[1]} passes, not {identity['bpe_dropout']:g} over {identity['bpe_passes']}; "
                        "resume with the same --bpe-dropout and --bpe-passes or start a new --out")
    if snapshot.meta.get("train_tokens") != identity["train_tokens"]:
        raise UserError(f"checkpoint {snapshot.path} was trained on other data; resume with the same --data "
                        "or start a new --out")


def parse_count(text: str, flag: str, unit: str) -> int | None:
    """A flag that takes a positive whole number of `unit` or "auto" (None)."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{flag} {text!r}: give a positive number of {unit} or auto")
    return value


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
