"""`budgetlm pretrain`: train a GPT (or a BERT, a T5: --arch) on a text corpus within a budget and keep the best weights.

setup (budget clock, device, data, tokenizer, model) → fit → save → report, top to bottom."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from budgetlm import tracking
from budgetlm.budget import Budget, format_duration, process_age
from budgetlm.config import Every, RunConfig
from budgetlm.errors import UserError
from budgetlm.report import prepare_out, say, say_done
from budgetlm.plan import plan_text
from budgetlm.pretraining import set_up
from budgetlm.train.checkpoint import atomic_write_bytes, save_model
from budgetlm.train.compile import compile_training_step
from budgetlm.train.objectives import VALIDATION_METRICS, objective, pretraining_task
from budgetlm.train.loop import FitConfig, fit
from budgetlm.train.metrics import RunLog, plot_losses
from budgetlm.train.optim import build_optimizer, parse_optim_args
from budgetlm.train.parallel import Parallel, join, main_first
from budgetlm.train.resume import Checkpoints, find_resume
from budgetlm.train.runtime import (
    Runtime,
    device_name,
    pick_device,
    pick_precision,
    set_threads,
    to_device,
)
from budgetlm.train.schedule import Schedule
from budgetlm.train.signals import GracefulStop


# Time the temperature's fit takes, in evaluations of the whole validation text, the final evaluation included:
# measured 1.4 on the default corpus' and 1.8 on tinyshakespeare's (a small text, where the fixed cost of the fit
# shows; the reserve's 2 s of slack covers it)
CALIBRATION_EVALS = 1.5


@tracking.closes_runs  # a run that raises still ends its tracker runs, as failed
def run(cfg: RunConfig, out: Path, *, quiet: bool = False, on_eval=None, count_startup: bool = False) -> dict:
    """Train, save the best weights and the run's files in `out`; return the summary.
    `on_eval(entry) -> bool` sees each periodic evaluation and may stop the run (see loop.fit).
    `count_startup`: the budget also counts the process' start-up (the command line: its user's wall clock)."""
    t = cfg.train
    tracking.require(t.report_to)  # a missing tracker package stops the run before anything else
    startup_s = process_age() if count_startup else 0.0
    budget = Budget(seconds=t.budget, max_steps=t.max_steps, max_tokens=t.max_tokens,
                    max_flops=t.budget_flops)  # the clock starts now: data preparation counts
    parallel = join(t.strategy, t.device)  # None outside torchrun
    if parallel is not None and cfg.model.arch != "gpt":
        parallel.close()
        raise UserError(f"--arch {cfg.model.arch} trains in one process only for now (its batches are not yet split "
                        "across processes); run it without torchrun")
    with main_first(parallel):
        prepare_out(out)
    checkpoints = Checkpoints(out / "checkpoints", keep=t.keep_checkpoints)
    snapshot = find_resume(t.resume, out, needs=("tokenizer.json",), warn=say)
    if snapshot is not None:
        budget.spent_s = snapshot.meta["spent_s"]
    budget.spent_s += startup_s
    threads = set_threads(t.threads)
    torch.manual_seed(t.seed)
    device = parallel.device if parallel is not None else pick_device(t.device)
    precision = pick_precision(t.precision, device)

    # Data, plan, model, batch and compile decision: what `budgetlm plan` shows (pretraining.py)
    setup = set_up(cfg, budget, device, precision, parallel=parallel, snapshot=snapshot,
                   resumed_tokenizer=out / "tokenizer.json" if snapshot is not None else None)
    data, mc, model, compiling, record = setup.data, setup.config, setup.model, setup.compiling, setup.record
    tokenizer, val_tokens, val_bytes = data.tokenizer, data.val_tokens, data.val_bytes
    text_tokens = len(data.train_tokens)
    micro_batch, micro_steps, sequences, lr = setup.micro_batch, setup.micro_steps, setup.sequences, setup.lr
    goal = objective(cfg.model.arch)
    budget.flops_per_token = model.flops_per_token()
    runtime = Runtime(device, precision, compiled=compiling.compile)
    task = pretraining_task(mc, tokenizer, setup.train_tokens, val_tokens, val_bytes, micro_batch, device,
                            seed=t.seed, label_smoothing=t.label_smoothing, mask_rate=t.mask_rate)
    task.micro_steps = micro_steps
    say(compiling.reason)
    if compiling.compile:
        # on the objective's own first batch (a BERT's masked, a T5's corrupted): the graphs compiled are those trained
        first = tuple(to_device(x, device) for x in task.batch(0, 0))
        seconds = compile_training_step(model, compiling.cache, first, task.loss, runtime.autocast)
        regions = "the Transformer block and the loss" if hasattr(model, "loss_blocks") else "the Transformer block"
        say(f"  compiled {regions} in {seconds:.1f}s")
    trained = model if parallel is None else parallel.wrap(model, t.strategy, precision)
    if parallel is not None:
        parallel.refuse_unsupported(ema=t.ema or 0.0, l1=t.l1)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    ema = setup.ema
    if ema and t.ema is None and parallel is not None and parallel.strategy == "fsdp":  # a flag is refused above
        say("the plan's moving average of the weights is left out: not supported under --strategy fsdp yet")
        ema = 0.0
        record["regularizers"] = [g for g in record["regularizers"] if g["name"] != "ema"]
    optimizer = build_optimizer(model, t.optim, lr=lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2),
                                extra=parse_optim_args(t.optim_args or ""), device=device, precision=precision)
    schedule = Schedule(t.schedule, t.warmup, t.decay_fraction, t.min_lr_ratio, gamma=t.gamma,
                        step_size=t.step_size, patience=t.plateau_patience)
    planned_steps = record["training"]["steps"]
    eval_every = t.eval_every or (Every(seconds=budget.seconds / 12) if budget.seconds
                                  else Every(steps=max(1, (t.max_steps or planned_steps or 1200) // 12)))
    stopping = t.stopping
    eval_batches = None if t.eval_tokens is None else max(1, math.ceil(t.eval_tokens / (micro_batch * mc.context)))
    calibrate = t.calibrate and goal == "causal_lm"  # the temperature is fitted on next-token predictions
    fit_cfg = FitConfig(lr=lr, schedule=schedule, micro_steps=micro_steps, grad_clip=t.grad_clip,
                        schedule_clock=t.schedule_clock, eval_every=eval_every, eval_batches=eval_batches,
                        stopping=stopping, save_every=t.save_every, l1=t.l1,
                        ema=ema,
                        final_eval=not calibrate, reserve_evals=CALIBRATION_EVALS if calibrate else 1)

    if parallel is not None:
        task.rank, task.world = parallel.rank, parallel.world
    if stopping.metric not in VALIDATION_METRICS[goal]:
        raise UserError(f"--early-stop: pretraining --arch {mc.arch} measures {', '.join(VALIDATION_METRICS[goal])}, "
                        f"not {stopping.metric!r}")
    main = parallel is None or parallel.main
    if snapshot is not None:
        say(f"resuming from {snapshot.path} (step {snapshot.meta['loop']['step']}, "
            f"{format_duration(snapshot.meta['spent_s'])} of the budget spent)")
    elif main:
        # the tokenizer and config go out first: a resume must find them whatever happens next
        atomic_write_bytes(out / "tokenizer.json", tokenizer.to_str().encode())
        atomic_write_bytes(out / "config.json", json.dumps(mc.to_dict(), indent=2).encode())
    if main:
        atomic_write_bytes(out / "plan.json", json.dumps(record, indent=2).encode())
    say(plan_text(record))
    say(f"budgetlm pretrain: {model.num_params() / 1e6:.2f}M parameters ({mc.n_layer} layers, d_model {mc.d_model}, "
        f"{mc.n_head} heads, context {mc.context}), vocab {tokenizer.get_vocab_size()}, "
        f"{text_tokens:,} training / {len(val_tokens):,} validation tokens")
    say(f"  device {device} ({threads} threads), {precision}, {'compiled' if runtime.compiled else 'eager'}, "
        f"batch {sequences * mc.context} tokens (micro-batch {micro_batch} × {micro_steps}"
        f"{f' × {parallel.world} processes, {parallel.strategy}' if parallel else ''}), "
        f"{t.optim} lr {lr:.2e} {t.schedule}, budget {budget.describe()}")

    tracked_plan = {k: v for k, v in (setup.identity["plan"] or {}).items() if k != "candidates"} or None  # plan.json has them
    tracker = tracking.start(t.report_to, t.tracking_uri, out, {**cfg.to_dict(), "plan": tracked_plan,
                                                                  "gpt": mc.to_dict()}) if main else None
    log = RunLog(out / "metrics.jsonl" if main else None, quiet=quiet or not main,
                 resume_step=snapshot.meta["loop"]["step"] if snapshot is not None else None, tracker=tracker)
    with GracefulStop() as stop:  # a signal after training, too, waits until the model is saved
        result = fit(model, trained, task, optimizer, fit_cfg, budget, runtime, log, checkpoints=checkpoints,
                     resume=snapshot, stop=stop, scaler=scaler,
                     run_meta=setup.identity, on_eval=on_eval, parallel=parallel)
        if main:
            compiling.cache.note_speed(runtime.compiled, result.per_s)  # what the next run's decision weighs
        raw = {"val_bpb": result.final.get("val_bpb"), "val_loss": result.final["val_loss"]}
        best = raw
        if calibrate and result.stop_reason != "interrupted":
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
        "objective": goal,
        "val_loss": best["val_loss"],
        **{k: v for k, v in result.final.items() if k in VALIDATION_METRICS[goal] and k not in ("val_loss", "val_bpb")},
        "best_val_bpb": best["val_bpb"],
        "best_val_loss": best["val_loss"],
        "temperature": mc.temperature,
        "uncalibrated_val_bpb": raw["val_bpb"],
        "best_step": result.best.get("step"),
        "tokens_seen": result.seen,
        "steps": result.steps,
        "params": model.num_params(),
        "flops_per_token": model.flops_per_token(),
        "flops": budget.flops(result.seen),
        "budget_flops": budget.max_flops,
        "wall_s": round(budget.elapsed(), 2),
        "budget_s": budget.seconds,
        "train_s": round(result.train_s, 2),
        # steady state: the first steps of a session (compilation, warm-up) are left out, as in the
        # peer benchmarks; tokens_per_s_overall counts every step
        "tokens_per_s": round(result.per_s, 1),
        "tokens_per_s_overall": round(result.overall_per_s, 1),
        "model_flops_per_s": round(result.per_s * model.flops_per_token(), 1),
        "device": device_name(device),
        "precision": precision,
        "compiled": runtime.compiled,
        "compile_decision": compiling.reason,
        "ema": fit_cfg.ema,
        "stop_reason": result.stop_reason,
        "skipped_steps": result.state.skipped_steps,
        "epochs": round(result.seen / max(text_tokens, 1), 3),  # of the text, however segmented
        "bpe_dropout": setup.bpe_rate,
        "bpe_passes": setup.bpe_passes,
        "config": cfg.to_dict(),
        "model": mc.to_dict(),
        "plan": setup.identity["plan"],
        # under torchrun: the processes, and the tokens/s above are the whole job's
        "world_size": parallel.world if parallel is not None else 1,
        "strategy": parallel.strategy if parallel is not None else None,
    }
    if goal != "causal_lm":  # bits per byte and a temperature are defined for next-token predictions only
        for key in ("best_val_bpb", "uncalibrated_val_bpb", "temperature"):
            summary.pop(key)
    if parallel is not None:
        summary["peak_memory_mb"] = parallel.peak_memory_mb()  # per rank
    if not main:
        parallel.close()
        return summary
    plot_losses(log.records, out / "loss.png", title=f"{mc.n_layer}×{mc.d_model} {mc.arch.upper()}, {summary['tokens_seen']:,} tokens")
    summary["wall_s"] = round(budget.elapsed(), 2)
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    tracking.finish(tracker, summary, [out / "loss.png"])
    calibrated = (f", at temperature {mc.temperature:.3f}; {summary['uncalibrated_val_bpb']:.4f} at 1"
                  if mc.temperature != 1 else "")
    figure = (f"{summary['best_val_bpb']:.4f} bits/byte (loss {summary['best_val_loss']:.4f}{calibrated})"
              if goal == "causal_lm" else f"{goal.replace('_', ' ')} loss {summary['best_val_loss']:.4f}")
    say_done(result, out, f"best validation {figure}, {summary['tokens_per_s']:,.0f} tokens/s", summary["wall_s"])
    if parallel is not None:
        parallel.close()
    return summary


def whole_model(parallel: Parallel | None, model):
    return parallel.whole(model) if parallel is not None else contextlib.nullcontext()
