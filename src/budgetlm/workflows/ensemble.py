"""`budgetlm finetune`: one fine-tuning (workflows/finetune.py), or with `--members` several of one
body, each with its own seed (head, dropout and data order), read as one classifier that averages their
class probabilities.

A pretrained body stops at its epoch limit, often with half of a time budget left; another member
trained in that half is a well-tried use of it (on SST-2 three seeds of one pretrained GPT scored
0.823, 0.842 and 0.830 alone, 0.839 averaged; docs/finetune.md). Each member is a complete
`finetune` run in OUT/members/K — its own summary, metrics, plots, checkpoints and resume — and
OUT holds the ensemble: model, config, tokenizer, summary and confusion matrix. A later member's
evaluations score the ensemble it completes, so it keeps the weights that make the best ensemble,
as a single run keeps its best evaluation."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from budgetlm import tracking
from budgetlm.budget import format_duration
from budgetlm.config import FinetuneConfig, plain
from budgetlm.data.labelled import LabelMap, load_split
from budgetlm.errors import UserError
from budgetlm.eval.classification import log_loss, plot_confusion, report, scores
from budgetlm.models.classifier import ClassifierConfig, Ensemble
from budgetlm.train.checkpoint import atomic_write_bytes, load_model, save_model
from budgetlm.train.classify import EVAL_BATCH, classification_tokenizer, encode_texts, predict_probs
from budgetlm.train.parallel import launched
from budgetlm.train.runtime import pick_device, set_threads
from budgetlm.report import prepare_out, say
from budgetlm.workflows import finetune

MAX_AUTO_MEMBERS = 4
# auto: another member when the time left is at least this share of the first member's time (a member
# cut short by the budget still finishes its schedule, on fewer examples)
MIN_MEMBER_SHARE = 0.75
RESERVE_SHARE = 0.01  # of the budget, kept back for evaluating and saving the ensemble (about 2 s of 600 on SST-2)
PLAN = "members.json"


def wanted(c: FinetuneConfig) -> bool:
    """Whether this run trains members: a number above 1, or auto for a budgetlm GPT body under a time
    budget (its epoch limit may leave time over; a Hugging Face encoder's member fills most of a usual
    budget — MiniLM 12 of 15 minutes on SST-2 — and a scratch model has no epoch limit)."""
    if c.members != "auto":
        if c.members > 1 and launched():
            raise UserError("--members above 1 trains in one process only for now; under torchrun give --members 1")
        return c.members > 1
    # under torchrun: one member
    return bool(c.budget) and c.model != "scratch" and not c.model.startswith("hf:") and not launched()


def run(c: FinetuneConfig, out: Path, *, quiet: bool = False) -> dict:
    """Fine-tune once, or train members in OUT/members/K while --members and the budget allow, then
    save the kept ones in `out` as one model; return the (ensemble's) summary."""
    if not wanted(c):
        return finetune.run(c, out, quiet=quiet)
    asked = None if c.members == "auto" else c.members
    if c.resume not in (None, "auto"):
        raise UserError("an ensemble resumes with --resume auto (each member from its own checkpoints)")
    prepare_out(out)
    total_s = c.budget
    plan_path = out / PLAN
    if c.resume == "auto" and plan_path.is_file():
        plan = json.loads(plan_path.read_text())
    else:
        shutil.rmtree(out / "members", ignore_errors=True)  # a fresh start: no member of an older run survives
        plan = {"budget_s": total_s, "asked": c.members, "members": []}
    reserve_s = RESERVE_SHARE * total_s if total_s else 0.0
    split_seed = c.split_seed if c.split_seed is not None else c.seed
    validation = Validation(dataclasses.replace(c, split_seed=split_seed))

    summaries: list[dict] = []
    k = 0
    while True:
        member_out = out / "members" / str(k)
        started = k < len(plan["members"])
        if not started:
            spent_s = sum(s["wall_s"] for s in summaries)
            left_s = total_s - spent_s - reserve_s if total_s else None
            if asked is not None:
                if k >= asked:
                    break
                budget_s = left_s / (asked - k) if left_s is not None else None
            else:
                if k >= MAX_AUTO_MEMBERS or (k > 0 and left_s < MIN_MEMBER_SHARE * summaries[0]["wall_s"]):
                    break
                budget_s = left_s
            if budget_s is not None and budget_s <= 0:
                break
            plan["members"].append({"seed": c.seed + k, "budget_s": budget_s})
            atomic_write_bytes(plan_path, json.dumps(plan, indent=2).encode())
        member = plan["members"][k]
        done = member_out / "summary.json"
        if started and done.is_file():
            summaries.append(json.loads(done.read_text()))
        else:
            of = f" of {asked}" if asked else ""
            limit = f", up to {format_duration(member['budget_s'])}" if member["budget_s"] else ""
            say(f"member {k + 1}{of}: seed {member['seed']}{limit}")
            member_cfg = dataclasses.replace(
                c, members=1, seed=member["seed"], split_seed=split_seed, budget=member["budget_s"],
                resume="auto" if started and c.resume == "auto" else None)
            with tracking.scope(out, f"finetune {out.resolve().name}", f"member-{k}"):
                summary = finetune.run(member_cfg, member_out, quiet=quiet, prior=validation.prior())
            if summary["stop_reason"] == "interrupted":
                say(f"stopped in member {k + 1}; resume with the same command and --resume auto --out {out}")
                return summary
            summaries.append(summary)
        if not validation.add(member_out, summaries[-1]["monitor"]):
            say(f"member {k + 1} does not improve the ensemble on the validation split: left out")
        k += 1
    return assemble(c, out, validation, summaries, total_s)


class Validation:
    """The validation split, and the members kept so far with their class probabilities on it (in its
    order). A member is kept only if it improves the ensemble's score on the split (greedy ensemble
    selection): a later member whose best weights were its first, untrained ones, adds nothing."""

    def __init__(self, c: FinetuneConfig):
        set_threads(c.threads)
        self.device = pick_device(c.device)
        _, _, self.texts, self.labels, _ = load_split(c.data, c.val, c.text_column, c.label_column,
                                                      c.val_fraction, c.split_seed, c.header)
        self.source = c.val or "the validation split"
        self.models: list[torch.nn.Module] = []
        self.tokenizers = []
        self.probs: list[np.ndarray] = []
        self.kept: list[bool] = []  # per member trained, kept or left out

    def add(self, folder: Path, monitor: str) -> bool:
        """Score the member in `folder` and keep it if the ensemble gains by `monitor`; True if kept."""
        model, config, tok = load_model(folder, self.device)
        tok = classification_tokenizer(tok, config["max_length"])
        if self.tokenizers and tok.to_str() != self.tokenizers[0].to_str():
            raise UserError(f"{folder} reads text with another tokenizer than the first member; start a new --out")
        if not self.models:
            self.y = np.asarray(LabelMap(tuple(config["labels"])).encode(self.labels, source=self.source))
        probs = predict_probs(model, encode_texts(tok, self.texts), EVAL_BATCH, self.device, model.pad_id)
        keep = self.improves(probs, monitor)
        if keep:
            self.models.append(model)
            self.tokenizers.append(tok)
            self.probs.append(probs)
        self.kept.append(keep)
        return keep

    def improves(self, probs: np.ndarray, monitor: str) -> bool:
        """Whether a member with these probabilities raises the kept ensemble's `monitor` (a first one does)."""
        if not self.probs:
            return True
        return self.score(np.mean([*self.probs, probs], axis=0), monitor) > self.score(np.mean(self.probs, axis=0),
                                                                                        monitor)

    def score(self, probs: np.ndarray, monitor: str) -> float:
        """`monitor` of these probabilities on the split, higher is better."""
        if monitor == "val_loss":
            return -log_loss(self.y, probs)
        predicted = probs.argmax(1)
        if monitor == "val_macro_f1":
            return scores(self.y, predicted)["macro_f1"]
        return float(np.mean(predicted == self.y))

    def prior(self) -> tuple[np.ndarray, int] | None:
        """What the next member's evaluations add themselves to: the summed probabilities and their count."""
        return (np.sum(self.probs, axis=0), len(self.probs)) if self.probs else None


def assemble(c: FinetuneConfig, out: Path, validation: Validation, summaries: list[dict],
             total_s: float | None) -> dict:
    """The members, read as one classifier: scored on the whole validation split and saved in `out`."""
    started = time.monotonic()
    folders = [out / "members" / str(k) for k in range(len(summaries))]
    members = validation.models
    first = members[0].config
    seeds = [s["config"]["finetune"]["seed"] for s, kept in zip(summaries, validation.kept) if kept]
    config = ClassifierConfig.from_dict({**first.to_dict(), "members": len(members),
                                         "extra": {**first.extra, "seeds": seeds}})
    # one member (the budget fitted no second, or no other helped) is saved as the plain classifier it is
    model = Ensemble(config, members).eval() if len(members) > 1 else members[0]
    labels = list(config.labels)
    probs = np.mean(validation.probs, axis=0)  # what the ensemble's forward computes
    scored = report(validation.y, probs.argmax(1), labels)
    val_loss = log_loss(validation.y, probs)

    save_model(out, model, config.to_dict(), validation.tokenizers[0])  # a single member's config says members 1
    atomic_write_bytes(out / "confusion.json", json.dumps(
        {"labels": labels, "rows": "true label", "columns": "predicted label", "matrix": scored["confusion"]},
        indent=2).encode())
    plot_confusion(scored["confusion"], labels, out / "confusion.png",
                   title=f"ensemble of {len(members)}: validation accuracy {scored['accuracy']:.4f}")
    with open(out / "metrics.jsonl", "w") as records:
        for k, folder in enumerate(folders):
            for line in (folder / "metrics.jsonl").read_text().splitlines():
                records.write(json.dumps({"member": k, **json.loads(line)}) + "\n")

    wall_s = sum(s["wall_s"] for s in summaries) + time.monotonic() - started
    summary = {
        "best_val_accuracy": scored["accuracy"],
        "best_val_macro_f1": scored["macro_f1"],
        "best_val_loss": val_loss,
        "per_class": scored["per_class"],
        "members": [{"folder": str(f.relative_to(out)), "seed": s["config"]["finetune"]["seed"],
                     "best_val_accuracy": s["best_val_accuracy"], "best_step": s["best_step"],
                     "epochs": s["epochs"], "wall_s": s["wall_s"], "stop_reason": s["stop_reason"], "kept": kept}
                    for f, s, kept in zip(folders, summaries, validation.kept)],
        "monitor": summaries[0]["monitor"],
        "examples_seen": sum(s["examples_seen"] for s in summaries),
        "epochs": round(sum(s["epochs"] for s in summaries), 3),
        "steps": sum(s["steps"] for s in summaries),
        "train_examples": summaries[0]["train_examples"],
        "train_examples_before_augmentation": summaries[0]["train_examples_before_augmentation"],
        "val_examples": len(validation.texts),
        "labels": labels,
        "params": model.num_params(),
        "wall_s": round(wall_s, 2),
        "budget_s": total_s,
        "train_s": round(sum(s["train_s"] for s in summaries), 2),
        "examples_per_s": round(sum(s["examples_seen"] for s in summaries)
                                / max(sum(s["train_s"] for s in summaries), 1e-9), 1),
        "device": str(validation.device),
        "precision": summaries[0]["precision"],
        "stop_reason": summaries[-1]["stop_reason"],
        "skipped_steps": sum(s["skipped_steps"] for s in summaries),
        "body": summaries[0]["body"],
        "source": c.model,
        "pooling": summaries[0]["pooling"],
        "settings": summaries[0]["settings"],
        "config": {"finetune": plain(c)},
    }
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    each = ", ".join(f"{s['best_val_accuracy']:.4f}{'' if kept else ' (left out)'}"
                     for s, kept in zip(summaries, validation.kept))
    say(f"done in {format_duration(wall_s)}: ensemble of {len(members)}, validation accuracy "
        f"{scored['accuracy']:.4f}, macro-F1 {scored['macro_f1']:.4f} (members alone: {each}); files in {out}")
    return summary
