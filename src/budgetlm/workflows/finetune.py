"""`budgetlm finetune`: train a text classifier within a budget and keep the best weights.

setup (budget clock, labelled data, body + tokenizer, head) → fit → full validation → save → report,
top to bottom. The body is a budgetlm GPT, BERT or T5 encoder from `pretrain`, a Hugging Face encoder
(`hf:PATH`), or a new GPT or LSTM (`scratch`)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from budgetlm import tracking
from budgetlm.budget import Budget, EarlyStop, Every, format_duration
from budgetlm.config import SIZES, FinetuneConfig, plain
from budgetlm.data.labelled import LabelMap, labelled_columns, load_split
from budgetlm.data.tokenizer import (
    EOT,
    PAD,
    default_vocab_size,
    load_tokenizer,
    train_tokenizer,
)
from budgetlm.data.tokens import content_hash
from budgetlm.errors import UserError
from budgetlm.eval.classification import load_plotting, log_loss, plot_confusion, plot_training, report
from budgetlm.models.classifier import Classifier, ClassifierConfig, EncoderBody, GPTBody
from budgetlm.models.gpt import GPT
from budgetlm.models.config import ModelConfig
from budgetlm.models.lstm import LSTMConfig, LSTMEncoder, word_tokenizer
from budgetlm.train.checkpoint import (
    atomic_write_bytes,
    load_model,
    read_config,
    save_model,
)
from budgetlm.train.classify import (
    EVAL_BATCH,
    ClassificationTask,
    classification_tokenizer,
    encode_texts,
    final_pass_cost,
    layer_scaled,
    predict_probs,
)
from budgetlm.train.kernels import apply_kernels
from budgetlm.train.loop import FitConfig, fit
from budgetlm.train.metrics import RunLog
from budgetlm.train.optim import LR_RELATIVE_TO_ADAMW, build_optimizer, default_lr, parse_optim_args
from budgetlm.train.parallel import join, launched, main_first
from budgetlm.train.resume import Checkpoints, find_resume
from budgetlm.train.runtime import Runtime, pick_device, pick_precision, set_threads
from budgetlm.train.schedule import Schedule
from budgetlm.train.signals import GracefulStop
from budgetlm.report import prepare_out, say, say_done

EVALS_PER_RUN = 12  # a classifier's dev set is small: evaluating often costs ~4% and finds the best weights
# Time kept after the final evaluation (saving, plots; their imports come before training): 2 s, or this
# share of a short budget, where 2 s would end the run early
AFTER_SHARE = 0.03
# A pretrained body stops after 3 epochs unless --epochs says otherwise (the GPT-1 and BERT recipes): on SST-2,
# a GPT pretrained for 10 minutes reached 0.828 in 3 epochs (3.6 minutes) against 0.821 in the 8 epochs a
# 10-minute budget bought, and MiniLM's best evaluations came before its third epoch (docs/finetune.md).
PRETRAINED_EPOCHS = 3.0
# ... but takes at least this many optimizer steps: on 500 SST-2 examples 3 epochs are 47 steps and reached 0.61
# dev accuracy, 15 epochs (235 steps) 0.65 — as much as augmenting the examples fivefold bought (docs/finetune.md).
MIN_PRETRAINED_STEPS = 500
EMA_DECAY = 0.999
MONITORS = ("val_accuracy", "val_macro_f1", "val_loss")
PRETRAINED_ARCHS = ("gpt", "bert", "t5")  # the budgetlm pretrain folders a body is built from
WORD_VOCAB = 20000


def check_labels(label_map: LabelMap, n_train: int, c: FinetuneConfig) -> None:
    n = len(label_map)
    if n > 1000 or (n_train >= 20 and n > n_train / 2):
        raise UserError(f"{c.data}: column {c.label_column!r} has {n} distinct values in {n_train} rows, too many "
                        "for classes; is it the label? Choose the label with --label-column")


def augment_training(texts: list[str], labels: list[str], c: FinetuneConfig) -> tuple[list[str], list[str]]:
    from budgetlm.data.augment import augment_dataset, parse_augment_spec
    from budgetlm.data.wordnet import load_synonyms

    spec = parse_augment_spec(c.augment)
    if not spec.enabled:
        return texts, labels
    synonyms = load_synonyms(c.synonyms) if spec.needs_synonyms else None
    return augment_dataset(texts, labels, spec, synonyms, c.seed)


def build_body(c: FinetuneConfig, train_texts: list[str]) -> tuple[torch.nn.Module, Tokenizer, str | None]:
    """(body, its tokenizer set up for classification, the token wrapped around each text or None)."""
    source = c.model
    if source.startswith("hf:"):
        from budgetlm.models.hf_encoder import load_hf_encoder

        body, tok = load_hf_encoder(source[3:])
        return body, tok, None
    if source == "scratch":
        if c.arch == "lstm":
            if (c.tokenizer or "word") == "word":
                tok = word_tokenizer(train_texts, c.vocab_size or WORD_VOCAB)
            else:
                tok = _bpe(train_texts, c)
            return LSTMEncoder(LSTMConfig(vocab_size=tok.get_vocab_size())), tok, None
        if c.tokenizer == "word":
            raise UserError("--tokenizer word is for --arch lstm; a GPT uses BPE")
        tok = _bpe(train_texts, c)
        n_layer, d_model, n_head = SIZES[c.size or "small"]
        config = ModelConfig(vocab_size=math.ceil(tok.get_vocab_size() / 64) * 64, context=c.max_length,
                           n_layer=n_layer, d_model=d_model, n_head=n_head, dropout=0.1, attention_dropout=0.0)
        return GPTBody(GPT(config)), tok, EOT
    folder = Path(source)
    if not folder.is_dir():
        raise UserError(f"--model {source}: no such folder; give a budgetlm pretrain folder, hf:PATH for a Hugging "
                        "Face encoder, or scratch")
    arch = read_config(folder).get("arch")
    if arch not in PRETRAINED_ARCHS:
        raise UserError(f"--model {source}: finetune starts from a pretrained GPT, BERT or T5 (config.json arch "
                        f"'gpt', 'bert' or 't5'), not arch {arch!r}")
    pretrained, _, tok = load_model(folder)
    if tok is None:
        raise UserError(f"--model {source}: no tokenizer.json; give the --out folder of budgetlm pretrain")
    if tok.token_to_id(EOT) is None:
        raise UserError(f"--model {source}: its tokenizer has no {EOT} token; use the tokenizer it was pretrained with")
    # the head's dropout inside the body too (unless pretraining used more): labelled data seen for
    # many epochs overfits a body that pretraining left without any
    config = ModelConfig.from_dict({**pretrained.config.to_dict(),
                                  "dropout": max(pretrained.config.dropout, c.dropout if c.dropout is not None else 0.1)})
    if arch != "gpt":  # an encoder: both ways over the text, the padding masked
        encoder = type(pretrained)(config)
        encoder.load_state_dict(pretrained.state_dict())
        return EncoderBody(encoder, tok.token_to_id(PAD) or 0), tok, EOT
    gpt = GPT(config)
    gpt.load_state_dict(pretrained.state_dict())
    return GPTBody(gpt), tok, EOT


def _bpe(texts: list[str], c: FinetuneConfig) -> Tokenizer:
    return train_tokenizer(texts, c.vocab_size or default_vocab_size(sum(len(t.encode()) for t in texts)))


def defaults(c: FinetuneConfig, body: torch.nn.Module) -> dict:
    """The settings left unset, chosen for the body. Learning rates are AdamW's, scaled for other
    optimizers as in pretraining: a pretrained body wants a fraction of its pretraining rate (GPT-1
    fine-tuned at a quarter), a new one a pretraining-sized rate."""
    lstm = body.kind == "lstm"
    optim = c.optim or ("adam" if lstm else "adamw")
    if c.lm_weight and not hasattr(body, "lm_loss"):
        raise UserError(f"--lm-weight needs a GPT body (a budgetlm pretrain folder or scratch --arch gpt); "
                        f"this {body.kind} body has no language-model head")
    if c.lr:
        lr = c.lr
    elif lstm:
        lr = 1e-3 * LR_RELATIVE_TO_ADAMW[optim]  # Keras' Adam default, the guide's
    elif body.kind == "hf":
        # 5e-5 for MiniLM's 384 (Hugging Face Trainer's default), 2.5e-5 for BERT-base. 1e-4 overfit SST-2
        # once a budget bought 3 epochs: best 0.894 after one epoch, then falling (docs/finetune.md)
        lr = 5e-5 * 384 / body.width * LR_RELATIVE_TO_ADAMW[optim]
    elif c.model == "scratch":
        lr = default_lr(body.width, optim)
    else:
        lr = default_lr(body.width, optim) / 4
    return {
        "lr": lr,
        "optim": optim,
        # lower layers hold the general features pretraining paid for; they move less than the top
        "layer_lr_decay": c.layer_lr_decay if c.layer_lr_decay is not None else (1.0 if c.model == "scratch" else 0.9),
        "weight_decay": c.weight_decay if c.weight_decay is not None else (0.0 if lstm else 0.01),
        "pooling": c.pooling or ("last" if lstm else "mean"),
        "dropout": c.dropout if c.dropout is not None else (0.5 if lstm else 0.1),
        # a budgetlm body: the average of the last ~1,000 steps led a GPT's raw weights at every evaluation on SST-2
        # (a BERT's: see docs/architectures.md); MiniLM gained nothing from it (and, updated every step then, lost
        # 18% of its speed; docs/finetune.md)
        "ema": c.ema if c.ema is not None else (EMA_DECAY if body.kind in PRETRAINED_ARCHS else 0.0),
        "lm_weight": c.lm_weight or 0.0,
    }


@tracking.closes_runs  # a run that raises still ends its tracker runs, as failed
def run(cfg: FinetuneConfig, out: Path, *, quiet: bool = False, prior: tuple[np.ndarray, int] | None = None) -> dict:
    """Train, keep the best weights, report; `prior`: see ClassificationTask (an ensemble's later members)."""
    tracking.require(cfg.report_to)  # a missing tracker package stops the run before anything else
    c = cfg
    epochs = c.epochs or (None if c.model == "scratch" else PRETRAINED_EPOCHS)
    if not (c.budget or c.max_steps or epochs):
        raise UserError("give a limit: --budget (e.g. 10m), --max-steps or --epochs")
    # the clock starts now: data preparation counts; an epoch limit is set once the data is read
    budget = Budget(seconds=c.budget, max_steps=c.max_steps,
                    max_tokens=math.inf if epochs else None)
    if c.max_length < 3:
        raise UserError(f"--max-length {c.max_length} is too short; give at least 3 tokens")
    if c.batch_size < 1 or (c.micro_batch is not None and c.micro_batch < 1):
        raise UserError("--batch-size and --micro-batch must be at least 1")
    if launched() and c.strategy == "fsdp":
        raise UserError("finetune shards no model yet: --strategy fsdp is for pretrain; use --strategy ddp (or auto)")
    parallel = join(c.strategy, c.device)  # None outside torchrun; always DDP
    main = parallel is None or parallel.main
    with main_first(parallel):
        prepare_out(out)
    checkpoints = Checkpoints(out / "checkpoints", keep=c.keep_checkpoints)
    snapshot = find_resume(c.resume, out, needs=("tokenizer.json", "config.json"), warn=say)
    if snapshot is not None:
        budget.spent_s = snapshot.meta["spent_s"]
    threads = set_threads(c.threads)
    torch.manual_seed(c.seed)
    device = parallel.device if parallel is not None else pick_device(c.device)
    precision = pick_precision(c.precision, device)

    # Data: labelled rows → train/validation split → label map → augmented training split.
    if c.data:  # the columns found, named in the saved config (predict's default) and the summary
        c = dataclasses.replace(c, **dict(zip(("text_column", "label_column"), labelled_columns(
            c.data, c.text_column, c.label_column, c.header))))
    train_texts, train_labels, val_texts, val_labels, written = load_split(
        c.data, c.val, c.text_column, c.label_column, c.val_fraction,
        c.split_seed if c.split_seed is not None else c.seed, c.header)
    label_map = LabelMap.from_labels(train_labels, written)
    check_labels(label_map, len(train_texts), c)
    val_y = label_map.encode(val_labels, source=c.val or "the validation split")
    n_original = len(train_texts)
    if c.augment:
        train_texts, train_labels = augment_training(train_texts, train_labels, c)
    train_y = label_map.encode(train_labels, source=c.data)
    if epochs and not c.epochs:  # a pretrained body's default limit: 3 epochs, but enough steps on small data
        epochs = max(epochs, MIN_PRETRAINED_STEPS * c.batch_size / len(train_texts))
    if epochs:
        budget.max_tokens = math.ceil(epochs * len(train_texts))
    identity = {"data": content_hash(train_texts, str(c.seed), *train_labels, "\x00val", *val_texts, *val_labels)}

    # Model: the body and its tokenizer, the head; a resumed run rebuilds both from --out.
    if snapshot is not None:
        _check_same_run(snapshot, identity)
        saved = read_config(out)
        model = Classifier(ClassifierConfig.from_dict(saved))
        tokenizer = classification_tokenizer(load_tokenizer(out / "tokenizer.json"), saved["max_length"])
        mc = model.config
        settings = saved["extra"]["settings"]
    else:
        body, tokenizer, wrap = build_body(c, train_texts)
        settings = defaults(c, body)
        max_length = min(c.max_length, body.max_length or c.max_length)
        tokenizer = classification_tokenizer(tokenizer, max_length, wrap)
        mc = ClassifierConfig(body=body.kind, body_config=body.config_dict(), labels=list(label_map.labels),
                              label_values=list(label_map.written) or None,
                              pooling=settings["pooling"], dropout=settings["dropout"], max_length=max_length,
                              text_column=c.text_column, label_column=c.label_column, source=c.model,
                              extra={"settings": settings})
        model = Classifier(mc, body)
    apply_kernels(model.to(device), device)
    if c.freeze_embeddings:
        model.body.token_embedding().requires_grad_(False)  # before the optimizer, which then leaves it out
    trained = model
    if parallel is not None:
        # DDP starts every rank from rank 0's weights. Some parameters may get no gradient in a step: a body
        # frozen for its first steps, or parts of a BERT, T5 or Hugging Face model a classifier does not call
        # (a pooler, a language-model head); a GPT body's head is tied to its embedding. Each rank then draws
        # its own dropout masks.
        trained = parallel.wrap(model, "ddp", precision, unused_parameters=c.freeze_steps > 0 or mc.body != "gpt")
        torch.manual_seed(int(np.random.SeedSequence([c.seed, parallel.rank]).generate_state(1)[0]))
    train_ids, val_ids = encode_texts(tokenizer, train_texts), encode_texts(tokenizer, val_texts)

    micro_batch = min(c.micro_batch or c.batch_size, c.batch_size)
    micro_steps = max(1, round(c.batch_size / micro_batch))
    runtime = Runtime(device, precision, compiled=False)  # batch shapes vary, so compiling would recompile
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    optimizer = build_optimizer(model, settings["optim"], lr=settings["lr"], weight_decay=settings["weight_decay"],
                                betas=(c.beta1, c.beta2), extra=parse_optim_args(c.optim_args or ""), device=device,
                                precision=precision)
    if settings["layer_lr_decay"] != 1.0:
        optimizer = layer_scaled(optimizer, model.layer_groups(), settings["layer_lr_decay"])
    schedule = Schedule(c.schedule, c.warmup, c.decay_fraction, c.min_lr_ratio, gamma=c.gamma, step_size=c.step_size,
                        patience=c.plateau_patience)
    eval_every = c.eval_every
    if eval_every is None:
        if budget.seconds:
            eval_every = Every(seconds=budget.seconds / EVALS_PER_RUN)
        else:
            planned = min(x for x in (c.max_steps, epochs and math.ceil(budget.max_tokens / c.batch_size)) if x)
            eval_every = Every(steps=max(1, planned // EVALS_PER_RUN))
    stopping = c.early_stop or EarlyStop("val_accuracy")
    if stopping.metric not in MONITORS:
        raise UserError(f"--early-stop: fine-tuning measures {', '.join(MONITORS)}, not {stopping.metric!r}")
    fit_cfg = FitConfig(lr=settings["lr"], schedule=schedule, micro_steps=micro_steps, grad_clip=c.grad_clip,
                        eval_every=eval_every, eval_share=0.02, stopping=stopping, log_every_s=2.0,
                        save_every=c.save_every, ema=settings.get("ema", 0.0),
                        final_eval=False,  # the final evaluation is predict's, below
                        after_s=min(2.0, AFTER_SHARE * budget.seconds) if budget.seconds else 2.0)
    task = ClassificationTask(train_ids, train_y, val_ids, val_y, micro_batch, micro_steps=micro_steps, seed=c.seed,
                              device=device, label_smoothing=c.label_smoothing, pad_id=model.pad_id,
                              body=model.body, freeze_steps=c.freeze_steps, lm_weight=settings.get("lm_weight", 0.0),
                              prior=prior, shard=(parallel.rank, parallel.world) if parallel is not None else (0, 1))
    fit_cfg.micro_steps = task.micro_steps  # this rank's share of the step

    if budget.seconds:
        load_plotting()
        fit_cfg.reserve_evals = final_pass_cost(model, task, runtime)

    if snapshot is not None:
        say(f"resuming from {snapshot.path} (step {snapshot.meta['loop']['step']}, "
            f"{format_duration(snapshot.meta['spent_s'])} of the budget spent)")
    elif main:
        # the tokenizer and config go out first: a resume must find them whatever happens next
        atomic_write_bytes(out / "tokenizer.json", tokenizer.to_str().encode())
        atomic_write_bytes(out / "config.json", json.dumps(mc.to_dict(), indent=2).encode())
    lengths = np.array([len(s) for s in train_ids])
    say(f"budgetlm finetune: {mc.body} body from {c.model}, {model.num_params() / 1e6:.2f}M parameters, "
        f"{len(label_map)} classes, {len(train_ids):,} training examples"
        f"{f' ({n_original:,} before augmentation)' if len(train_ids) != n_original else ''} "
        f"(mean {lengths.mean():.1f} tokens), {len(val_ids):,} validation")
    say(f"  device {device} ({threads} threads), {precision}, batch {micro_batch * micro_steps} "
        f"(micro-batch {task.micro_batch} × {task.micro_steps}"
        f"{f' × {parallel.world} processes, {parallel.strategy}' if parallel else ''}), "
        f"{settings['optim']} lr {settings['lr']:.2e} {c.schedule}"
        f"{_layer_decay(settings)}, {mc.pooling} pooling, budget {budget.describe(epochs)}")

    tracker = tracking.start(c.report_to, c.tracking_uri, out, {"finetune": plain(c),
                                                                  "settings": settings}) if main else None
    log = RunLog(out / "metrics.jsonl" if main else None, quiet=quiet or not main,
                 resume_step=snapshot.meta["loop"]["step"] if snapshot is not None else None, tracker=tracker)
    with GracefulStop() as stop:
        result = fit(model, trained, task, optimizer, fit_cfg, budget, runtime, log, checkpoints=checkpoints,
                     resume=snapshot, stop=stop, scaler=scaler, run_meta=identity, parallel=parallel)
    model.requires_grad_(True)

    # The kept weights over the whole validation set, as `predict` computes it (same batches, no autocast).
    model.eval()
    probs = predict_probs(model, val_ids, EVAL_BATCH, device, model.pad_id, shard=(task.rank, task.world))
    scored = report(np.asarray(val_y), probs.argmax(1), list(label_map.labels))
    val_loss = log_loss(np.asarray(val_y), probs)
    if result.stop_reason != "interrupted":
        log.record(kind="final", step=result.steps, examples=result.seen, elapsed_s=budget.elapsed(),
                   best_step=result.best.get("step"), val_loss=val_loss, val_accuracy=scored["accuracy"],
                   val_macro_f1=scored["macro_f1"], val_examples=len(val_ids), val_full=True)
    if not main:
        parallel.close()
        return {"best_val_accuracy": scored["accuracy"], "steps": result.steps, "stop_reason": result.stop_reason}
    save_model(out, model, mc.to_dict(), tokenizer)
    atomic_write_bytes(out / "confusion.json", json.dumps(
        {"labels": list(label_map.labels), "rows": "true label", "columns": "predicted label",
         "matrix": scored["confusion"]}, indent=2).encode())
    plot_confusion(scored["confusion"], list(label_map.labels), out / "confusion.png",
                   title=f"validation accuracy {scored['accuracy']:.4f}")
    plot_training(log.records, out / "loss.png", title=f"{mc.body} classifier, {result.seen:,} examples")
    summary = {
        "best_val_accuracy": scored["accuracy"],
        "best_val_macro_f1": scored["macro_f1"],
        "best_val_loss": val_loss,
        "per_class": scored["per_class"],
        "best_step": result.best.get("step"),
        "monitor": stopping.metric,
        "examples_seen": result.seen,
        "epochs": round(result.seen / max(len(train_ids), 1), 3),
        "steps": result.steps,
        "train_examples": len(train_ids),
        "train_examples_before_augmentation": n_original,
        "val_examples": len(val_ids),
        "labels": list(label_map.labels),
        "params": model.num_params(),
        "wall_s": round(budget.elapsed(), 2),
        "budget_s": budget.seconds,
        "train_s": round(result.train_s, 2),
        "examples_per_s": round(result.per_s, 1),
        "device": str(device),
        "precision": precision,
        "stop_reason": result.stop_reason,
        "skipped_steps": result.state.skipped_steps,
        "body": mc.body,
        "source": c.model,
        "pooling": mc.pooling,
        "settings": settings,
        "config": {"finetune": plain(c)},
        "world_size": parallel.world if parallel is not None else 1,
        "strategy": parallel.strategy if parallel is not None else None,
    }
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    tracking.finish(tracker, summary, [out / "loss.png", out / "confusion.png"])
    say_done(result, out, f"validation accuracy {scored['accuracy']:.4f}, macro-F1 {scored['macro_f1']:.4f}, "
             f"{summary['examples_per_s']:,.0f} examples/s, {summary['epochs']} epochs", summary["wall_s"])
    if parallel is not None:
        parallel.close()
    return summary


def _check_same_run(snapshot, identity: dict) -> None:
    if snapshot.meta.get("data") != identity["data"]:
        raise UserError(f"checkpoint {snapshot.path} was trained on other data (or another --augment or --seed); "
                        "resume with the same data and flags, or start a new --out")


def _layer_decay(settings: dict) -> str:
    decay = settings["layer_lr_decay"]
    return f" (×{decay:g} per layer down)" if decay != 1.0 else ""
