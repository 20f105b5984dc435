"""`budgetlm pretrain`: train a GPT on a text corpus within a budget and keep the best weights.

setup (budget clock, device, data, tokenizer, model) → fit → save → report, top to bottom."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import time
from pathlib import Path

import torch

from budgetlm import tracking
from budgetlm.budget import Budget, format_duration
from budgetlm.config import Every, RunConfig
from budgetlm.data.default_corpus import default_corpus_files
from budgetlm.data.sources import load_corpus, split_validation
from budgetlm.data.tokenizer import default_vocab_size, load_tokenizer, train_tokenizer
from budgetlm.data.tokens import bpe_dropout_tokens, cache_dir, cached_tokens, content_hash, supports_bpe_dropout
from budgetlm.errors import UserError
from budgetlm.models.gpt import GPT
from budgetlm.report import prepare_out, say, say_done
from budgetlm.plan import Plan, bpe_passes, given_or_planned, model_for, plan
from budgetlm.train.batching import largest_micro_batch
from budgetlm.train.checkpoint import atomic_write_bytes, save_model
from budgetlm.train.kernels import apply_kernels
from budgetlm.train.lm import LanguageModelTask
from budgetlm.train.loop import FitConfig, fit
from budgetlm.train.metrics import RunLog, plot_losses
from budgetlm.train.optim import build_optimizer, default_lr, parse_optim_args
from budgetlm.train.parallel import Parallel, launched
from budgetlm.train.resume import Checkpoints, find_resume
from budgetlm.train.runtime import (
    Runtime,
    pick_device,
    pick_precision,
    set_threads,
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


# Time the temperature's fit takes, in evaluations of the whole validation text, the final evaluation included:
# measured 1.4 on the default corpus' and 1.8 on tinyshakespeare's (a small text, where the fixed cost of the fit
# shows; the reserve's 2 s of slack covers it)
CALIBRATION_EVALS = 1.5


def run(cfg: RunConfig, out: Path, *, quiet: bool = False, on_eval=None) -> dict:
    """Train, save the best weights and the run's files in `out`; return the summary.
    `on_eval(entry) -> bool` sees each periodic evaluation and may stop the run (see loop.fit)."""
    t = cfg.train
    tracking.require(t.report_to)  # a missing tracker package stops the run before anything else
    budget = Budget(seconds=t.budget, max_steps=t.max_steps,
                    max_tokens=t.max_tokens)  # the clock starts now: data preparation counts
    parallel = start_parallel(t)  # None outside torchrun
    with main_first(parallel):
        prepare_out(out)
    checkpoints = Checkpoints(out / "checkpoints", keep=t.keep_checkpoints)
    snapshot = find_resume(t.resume, out, needs=("tokenizer.json",), warn=say)
    if snapshot is not None:
        budget.spent_s = snapshot.meta["spent_s"]
    threads = set_threads(t.threads)
    torch.manual_seed(t.seed)
    device = parallel.device if parallel is not None else pick_device(t.device)
    precision = pick_precision(t.precision, device)

    # Data: documents → train/validation split → tokenizer → cached token streams.
    sources = cfg.data.data or [str(p) for p in default_corpus_files()]
    corpus = load_corpus(sources, text_field=cfg.data.text_field, text_column=cfg.data.text_column)
    if cfg.data.val:
        train_docs = corpus.documents
        val_docs = load_corpus(cfg.data.val, text_field=cfg.data.text_field, text_column=cfg.data.text_column).documents
    else:
        train_docs, val_docs = split_validation(corpus.documents, cfg.data.val_fraction)
    with main_first(parallel):  # the other processes read what the first tokenized into the cache
        # a resumed run keeps the tokenizer it started with
        tokenizer = load_tokenizer(out / "tokenizer.json") if snapshot is not None else tokenizer_for(train_docs, cfg)
        train_tokens = cached_tokens(train_docs, tokenizer, "train")
        val_tokens = cached_tokens(val_docs, tokenizer, "val")
    val_bytes = sum(len(d.encode("utf-8")) for d in val_docs)

    planned = None
    if budget.seconds and not (cfg.model.size or cfg.model.n_layer or cfg.model.d_model or cfg.model.n_head):
        # a resumed run keeps the plan its first session made for the whole budget; planning again
        # for the time left could pick another shape, which the checkpoint cannot continue
        planned = Plan.from_dict(snapshot.meta.get("plan")) if snapshot is not None else None
        if planned is None and (parallel is None or parallel.main):
            planned = plan(budget.seconds - budget.elapsed(), train_tokens=len(train_tokens),
                           vocab=tokenizer.get_vocab_size(), device=device, precision=precision,
                           micro_batch=t.micro_batch)
        if parallel is not None:  # the first process plans for all
            planned = parallel.share(planned)
        say(planned.describe())
    mc = model_for(cfg.model, tokenizer.get_vocab_size(), planned)
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
        with main_first(parallel):
            train_tokens, drawn = bpe_dropout_tokens(train_docs, tokenizer, train_tokens, bpe_rate, passes, t.seed)
        if drawn:
            if snapshot is not None:
                say("the BPE-dropout segmentations this run started with are no longer cached: drew new ones, so "
                    "the resumed run reads other segmentations of the same text")
            say(f"re-segmented the training text {passes} times with BPE-dropout {bpe_rate:g} in "
                f"{time.monotonic() - started:.1f}s")

    model = GPT(mc).to(device)
    asked_tokens = t.batch_tokens if isinstance(t.batch_tokens, int) else None
    if asked_tokens is not None:
        batch_tokens = asked_tokens
    elif planned is not None and mc.context == planned.context:
        batch_tokens = planned.batch_tokens
    else:
        batch_tokens = (t.micro_batch or 8) * mc.context
    compiled = should_compile(t.compile, device, budget.seconds)
    apply_kernels(model, device, compiled=compiled)
    trained = model if parallel is None else parallel.wrap(model, t.strategy, precision)
    forward = torch.compile(trained) if compiled else trained
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
    sequences = micro_batch * micro_steps  # per optimizer step, over all processes
    if parallel is not None:
        micro_batch, micro_steps = parallel.split_batch(parallel.share(micro_batch), micro_steps)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    lr = t.lr or default_lr(mc.d_model, t.optim)
    optimizer = build_optimizer(model, t.optim, lr=lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2),
                                extra=parse_optim_args(t.optim_args or ""), device=device)
    schedule = Schedule(t.schedule, t.warmup, t.decay_fraction, t.min_lr_ratio, gamma=t.gamma,
                        step_size=t.step_size, patience=t.plateau_patience)
    eval_every = t.eval_every or (Every(seconds=budget.seconds / 12) if budget.seconds
                                  else Every(steps=max(1, (t.max_steps or 1200) // 12)))
    stopping = t.stopping
    eval_batches = None if t.eval_tokens is None else max(1, math.ceil(t.eval_tokens / (micro_batch * mc.context)))
    fit_cfg = FitConfig(lr=lr, schedule=schedule, micro_steps=micro_steps, grad_clip=t.grad_clip,
                        schedule_clock=t.schedule_clock, eval_every=eval_every, eval_batches=eval_batches,
                        stopping=stopping, save_every=t.save_every, l1=t.l1,
                        ema=t.ema or 0.0,
                        final_eval=not t.calibrate, reserve_evals=CALIBRATION_EVALS if t.calibrate else 1)

    task = LanguageModelTask(train_tokens, val_tokens, val_bytes, mc.context, micro_batch, device, t.seed,
                             label_smoothing=t.label_smoothing)
    task.micro_steps = micro_steps
    if parallel is not None:
        task.rank, task.world = parallel.rank, parallel.world
    if stopping.metric not in ("val_loss", "val_bpb", "val_ppl"):
        raise UserError(f"--early-stop: pretraining measures val_loss, val_bpb and val_ppl, not {stopping.metric!r}")
    main = parallel is None or parallel.main
    if snapshot is not None:
        say(f"resuming from {snapshot.path} (step {snapshot.meta['loop']['step']}, "
            f"{format_duration(snapshot.meta['spent_s'])} of the budget spent)")
    elif main:
        # the tokenizer and config go out first: a resume must find them whatever happens next
        atomic_write_bytes(out / "tokenizer.json", tokenizer.to_str().encode())
        atomic_write_bytes(out / "config.json", json.dumps(mc.to_dict(), indent=2).encode())
    say(f"budgetlm pretrain: {model.num_params() / 1e6:.2f}M parameters ({mc.n_layer} layers, d_model {mc.d_model}, "
        f"{mc.n_head} heads, context {mc.context}), vocab {tokenizer.get_vocab_size()}, "
        f"{text_tokens:,} training / {len(val_tokens):,} validation tokens")
    say(f"  device {device} ({threads} threads), {precision}, {'compiled' if compiled else 'eager'}, "
        f"batch {sequences * mc.context} tokens (micro-batch {micro_batch} × {micro_steps}"
        f"{f' × {parallel.world} processes, {parallel.strategy}' if parallel else ''}), "
        f"{t.optim} lr {lr:.2e} {t.schedule}, budget {budget.describe()}")

    tracker = tracking.start(t.report_to, t.tracking_uri, out, {**cfg.to_dict(), "plan": identity["plan"],
                                                                  "gpt": mc.to_dict()}) if main else None
    log = RunLog(out / "metrics.jsonl" if main else None, quiet=quiet or not main,
                 resume_step=snapshot.meta["loop"]["step"] if snapshot is not None else None, tracker=tracker)
    with GracefulStop() as stop:  # a signal after training, too, waits until the model is saved
        result = fit(model, forward, task, optimizer, fit_cfg, budget, runtime, log, checkpoints=checkpoints,
                     resume=snapshot, stop=stop, scaler=scaler,
                     run_meta=identity, on_eval=on_eval, parallel=parallel)
        raw = {"val_bpb": result.final["val_bpb"], "val_loss": result.final["val_loss"]}
        best = raw
        if t.calibrate and result.stop_reason != "interrupted":
            model.eval()
            with torch.no_grad(), runtime.autocast(), whole_model(parallel, model):
                calibration = task.calibrate(model)  # also the final evaluation at temperature 1
            raw = best = {"val_bpb": calibration.raw_val_bpb, "val_loss": calibration.raw_val_loss}
            if calibration.val_bpb < calibration.raw_val_bpb:  # cross-fitted: on positions the fit did not see
                mc.temperature = calibration.temperature
                best = {"val_bpb": calibration.val_bpb, "val_loss": calibration.val_loss}
            # the final evaluation, with the figure reported: the curve in metrics.jsonl ends where the summary does
            log.record(kind="final", step=result.steps, tokens=result.seen, elapsed_s=budget.elapsed(),
                       best_step=result.best.get("step"), **best, val_tokens=len(val_tokens) - 1, val_full=True,
                       uncalibrated_val_bpb=raw["val_bpb"], temperature=mc.temperature)
        if parallel is None:
            save_model(out, model, mc.to_dict(), tokenizer)
        else:
            full = parallel.full_state_dict(model)  # gathered from every rank
            if parallel.main:
                save_model(out, model, mc.to_dict(), tokenizer, state=full)
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
        "plan": identity["plan"],
        # under torchrun: the processes, and the tokens/s above are the whole job's
        "world_size": parallel.world if parallel is not None else 1,
        "strategy": parallel.strategy if parallel is not None else None,
    }
    if parallel is not None:
        summary["peak_memory_mb"] = parallel.peak_memory_mb()  # per rank
    if not main:
        parallel.close()
        return summary
    plot_losses(log.records, out / "loss.png", title=f"{mc.n_layer}×{mc.d_model} GPT, {summary['tokens_seen']:,} tokens")
    summary["wall_s"] = round(budget.elapsed(), 2)
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    tracking.finish(tracker, summary, [out / "loss.png"])
    calibrated = (f", at temperature {mc.temperature:.3f}; {summary['uncalibrated_val_bpb']:.4f} at 1"
                  if mc.temperature != 1 else "")
    say_done(result, out, f"best validation {summary['best_val_bpb']:.4f} bits/byte (loss "
             f"{summary['best_val_loss']:.4f}{calibrated}), {summary['tokens_per_s']:,.0f} tokens/s", summary["wall_s"])
    if parallel is not None:
        parallel.close()
    return summary


def start_parallel(t) -> Parallel | None:
    """This process's place among several under torchrun, None outside it."""
    if not launched():
        if t.strategy != "auto":
            say(f"warning: --strategy {t.strategy} applies under torchrun only (docs/distributed.md); training in one process")
        return None
    for flag, value in (("--ema", t.ema), ("--l1", t.l1)):
        if value:
            raise UserError(f"{flag} is not supported under torchrun yet; train without it or in one process")
    return Parallel.start(pick_device(t.device))


def main_first(parallel: Parallel | None):
    return parallel.main_first() if parallel is not None else contextlib.nullcontext()


def whole_model(parallel: Parallel | None, model):
    return parallel.whole(model) if parallel is not None else contextlib.nullcontext()


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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
