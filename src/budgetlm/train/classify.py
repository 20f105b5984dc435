"""Text classification as a task for the loop: length-bucketed batches padded only to their own
longest row, summed cross-entropy, and validation loss, accuracy and macro-F1.

Padding costs compute for nothing: SST-2's training sentences average 13 MiniLM tokens, and random
batches of 32 padded to their longest row hold about 3 times as many tokens as the sentences
themselves. Batching sentences of similar length brings that close to 1."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, processors
from torch import nn

from budgetlm.errors import UserError
from budgetlm.eval.classification import scores
from budgetlm.train.muon import MuonWithAdamW
from budgetlm.train.parallel import split_batch
from budgetlm.train.runtime import to_device
from budgetlm.train.selection import standard_error

POOL_BATCHES = 50     # a shuffled pool of this many batches is sorted by length before it is cut
EVAL_WINDOW = 8       # validation batches per length-sorted window of a fixed random order
EVAL_BATCH = 64       # examples per batch in evaluation and prediction
CPU = torch.device("cpu")


def classification_tokenizer(tok: Tokenizer, max_length: int, wrap_with: str | None = None) -> Tokenizer:
    """`tok` set up for classification inputs: truncated to `max_length` tokens (special tokens
    included), never padded (batches pad themselves), and with `wrap_with` around each text when
    given (a GPT reads its document separator before and after, as around every pretraining document)."""
    if wrap_with is not None:
        token_id = tok.token_to_id(wrap_with)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{wrap_with} $A {wrap_with}", special_tokens=[(wrap_with, token_id)])
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def encode_texts(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text; an empty one becomes a single id 0, so every row has a real token."""
    return [np.asarray(e.ids or [0], dtype=np.int64) for e in tok.encode_batch(texts)]


def collate(seqs: list[np.ndarray], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the mask (1 on real tokens), as long as the longest row."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.int64)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.from_numpy(s)
        mask[row, : len(s)] = 1
    return ids, mask


class LengthBucketSampler:
    """Each epoch shuffles the examples, sorts every pool of POOL_BATCHES batches' worth by length,
    cuts it into batches and shuffles the batches. Batch `index` is a pure function of (seed, index),
    so a resumed run sees exactly the batches it would have seen. Every batch is full: the few
    examples an epoch's shuffle leaves over wait for a later epoch."""

    def __init__(self, lengths: np.ndarray, batch: int, seed: int = 0):
        self.lengths, self.seed = np.asarray(lengths), seed
        self.batch = min(batch, len(self.lengths))
        self.per_epoch = len(self.lengths) // self.batch
        self._epoch, self._batches = -1, []

    def _plan_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))[: self.per_epoch * self.batch]
        batches = []
        pool = self.batch * POOL_BATCHES
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch] for i in range(0, len(chunk), self.batch)]
        self._epoch, self._batches = epoch, [batches[i] for i in rng.permutation(len(batches))]

    def batch_at(self, index: int) -> np.ndarray:
        epoch, k = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._plan_epoch(epoch)
        return self._batches[k]


def length_sorted_batches(lengths: np.ndarray, batch: int) -> list[np.ndarray]:
    """Indices in batches of similar length (for inference, where order does not matter)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch] for i in range(0, len(order), batch)]


@torch.no_grad()
def predict_probs(forward: Callable, seqs: list[np.ndarray], batch: int, device: torch.device,
                  pad_id: int = 0, shard: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Class probabilities (examples, classes), in the order of `seqs`. `shard` (rank, processes): this
    rank computes every processes-th batch, and the ranks' rows are added up: the whole array on every rank."""
    rank, world = shard
    probs = None
    for number, rows in enumerate(length_sorted_batches(np.array([len(s) for s in seqs]), batch)):
        if number % world != rank:
            continue
        ids, mask = collate([seqs[i] for i in rows], pad_id)
        p = torch.softmax(forward(ids.to(device), mask.to(device)).float(), dim=-1).cpu().numpy()
        if probs is None:
            probs = np.zeros((len(seqs), p.shape[1]), dtype=np.float32)
        probs[rows] = p
    if world > 1:  # a rank without a batch learns the number of classes from the others
        classes = torch.tensor([0 if probs is None else probs.shape[1]], device=device)
        torch.distributed.all_reduce(classes, op=torch.distributed.ReduceOp.MAX)
        every = torch.zeros((len(seqs), int(classes)), device=device)
        if probs is not None:
            every += torch.from_numpy(probs).to(device)
        torch.distributed.all_reduce(every)  # each row is one rank's, zeros elsewhere: the sum is exact
        probs = every.cpu().numpy()
    return probs


def final_pass_cost(model: nn.Module, task: ClassificationTask, runtime) -> float:
    """Time of the final evaluation (`predict_probs`, in fp32 as `predict` computes) relative to a
    periodic one (the task's evaluation, in the run's precision), timed on the same first validation
    batch: the evaluations of all validation batches the loop keeps time for after training. 1 where
    both compute alike (fp32)."""
    if runtime.precision == "fp32":
        return 1.0
    rows = task.eval_batches[0]
    seqs = [task.val[i] for i in rows]
    passes = {"periodic": lambda: task.evaluate(model, 1),
              "final": lambda: predict_probs(model, seqs, len(rows), task.device, task.pad_id)}
    times = {}
    model.eval()
    with torch.no_grad():
        for name, run in passes.items():
            durations = []
            for _ in range(3):  # the first warms up; the quicker of the others is the least disturbed
                started = time.monotonic()
                with runtime.autocast() if name == "periodic" else contextlib.nullcontext():
                    run()
                durations.append(time.monotonic() - started)
            times[name] = min(durations[1:])
    model.train()
    return times["final"] / max(times["periodic"], 1e-9)


class ClassificationTask:
    unit = "examples"

    def __init__(self, train: list[np.ndarray], train_labels: list[int], val: list[np.ndarray],
                 val_labels: list[int], micro_batch: int, *, micro_steps: int = 1, seed: int = 0,
                 device: torch.device = CPU, eval_batch: int = EVAL_BATCH,
                 label_smoothing: float = 0.0, pad_id: int = 0,
                 body: nn.Module | None = None, freeze_steps: int = 0, lm_weight: float = 0.0,
                 prior: tuple[np.ndarray, int] | None = None, shard: tuple[int, int] = (0, 1)):
        """`body` is frozen (no gradients, so no updates) for the first `freeze_steps` optimizer
        steps: the new head first learns from the pretrained features instead of disturbing them.
        With `lm_weight`, the training loss per example adds that weight times the body's mean
        next-token loss on the batch (`forward` must then take `lm_loss=True`).
        `prior` is (the summed validation probabilities of n earlier ensemble members, in validation
        order; n): evaluations then score the ensemble this model completes, so the weights kept are
        those that make the best ensemble (the model alone: `val_member_accuracy`).
        `shard` (rank, processes) under torchrun: `micro_batch` × `micro_steps` are one process's step, whose
        examples the ranks split in order (this rank's `micro_batch` × `micro_steps` then its share), and
        each rank evaluates every processes-th validation batch."""
        self.train, self.train_labels = train, np.asarray(train_labels, dtype=np.int64)
        self.val, self.val_labels = val, np.asarray(val_labels, dtype=np.int64)
        self.rank, self.world = shard
        self.step_batches = micro_steps  # the sampler's batches per optimizer step, whatever the processes
        self.micro_batch, self.micro_steps = split_batch(micro_batch, micro_steps, self.world, "examples",
                                                         f"give --batch-size a multiple of {self.world}")
        self._step_rows: tuple[int, np.ndarray] | None = None
        self.label_smoothing, self.pad_id, self.device = label_smoothing, pad_id, device
        self.body, self.freeze_steps, self.lm_weight, self.prior = body, freeze_steps, lm_weight, prior
        # what the body trains once unfrozen: parameters frozen for the whole run stay frozen
        self.body_trainable = [p for p in body.parameters() if p.requires_grad] if body is not None else []
        self.sampler = LengthBucketSampler(np.array([len(s) for s in train]), micro_batch, seed)
        # seeded by the validation set itself: every run on it samples the same examples during training
        self.eval_batches = self._eval_plan(np.array([len(s) for s in val]), eval_batch, content_seed(val, val_labels))

    @staticmethod
    def _eval_plan(lengths: np.ndarray, batch: int, seed: int) -> list[np.ndarray]:
        """Validation batches: a fixed random order cut into windows of EVAL_WINDOW batches, each
        sorted by length and cut into batches taken in random order, so that the first few batches
        are a fair sample (of the examples and of the time a batch takes) and padding stays small."""
        rng = np.random.default_rng([seed, 1 << 20])
        order = rng.permutation(len(lengths))
        window = batch * EVAL_WINDOW
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            cut = [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
            batches += [cut[i] for i in rng.permutation(len(cut))]
        return batches

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, ...]:
        if self.body is not None and self.freeze_steps and micro == 0:
            for p in self.body_trainable:
                p.requires_grad_(step >= self.freeze_steps)
        if self._step_rows is None or self._step_rows[0] != step:
            # the step's examples, in the order one process reads them: a pure function of (seed, step)
            self._step_rows = step, np.concatenate([self.sampler.batch_at(step * self.step_batches + m)
                                                    for m in range(self.step_batches)])
        share = self.micro_batch * self.micro_steps
        start = self.rank * share + micro * self.micro_batch
        rows = self._step_rows[1][start : start + self.micro_batch]
        ids, mask = collate([self.train[i] for i in rows], self.pad_id)
        return ids, mask, torch.from_numpy(self.train_labels[rows])

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return len(batch[2])

    consumed = count  # every example carries a loss

    def loss(self, forward: Callable, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids, mask, labels = batch
        if not self.lm_weight:
            return F.cross_entropy(forward(ids, mask).float(), labels, reduction="sum",
                                   label_smoothing=self.label_smoothing)
        logits, lm_loss = forward(ids, mask, lm_loss=True)
        classification = F.cross_entropy(logits, labels, reduction="sum", label_smoothing=self.label_smoothing)
        return classification + self.lm_weight * len(labels) * lm_loss.float()

    def eval_batch_count(self) -> int:
        return len(self.eval_batches)

    def evaluate(self, forward: Callable, max_batches: int | None) -> dict[str, float]:
        """Validation loss, accuracy and macro-F1 over the whole set (None) or its first `max_batches`
        batches, a fixed random sample (marked `val_sample_examples`, with the standard errors
        `val_loss_se` and `val_accuracy_se`). The per-batch results stay on the device until the end,
        so a GPU is not made to wait after every batch."""
        batches = self.eval_batches[:max_batches]
        losses, truth, guess, alone = [], [], [], []
        for rows in batches[self.rank :: self.world]:
            ids, mask = collate([self.val[i] for i in rows], self.pad_id)
            logits = forward(to_device(ids, self.device), to_device(mask, self.device)).detach().float()
            if self.prior is not None:
                alone.append(logits.argmax(-1))
                prior_sum, n = self.prior
                probs = (to_device(torch.from_numpy(prior_sum[rows]), self.device).to(logits)
                         + logits.softmax(-1)) / (n + 1)
                logits = probs.clamp(min=1e-30).log()  # the ensemble's, as log-probabilities
            losses.append(F.cross_entropy(logits, to_device(torch.from_numpy(self.val_labels[rows]), self.device),
                                          reduction="none"))
            truth.append(self.val_labels[rows])
            guess.append(logits.argmax(-1))
        if self.world > 1:
            losses, guess = self._gathered(batches, losses, torch.float32), self._gathered(batches, guess, torch.int64)
            if self.prior is not None:
                alone = self._gathered(batches, alone, torch.int64)
            truth = [self.val_labels[rows] for rows in batches]
        truth, guess = np.concatenate(truth), torch.cat(guess).cpu().numpy()
        losses = torch.cat(losses).cpu().double().numpy()
        s = scores(truth, guess)
        metrics = {"val_loss": float(losses.mean()), "val_accuracy": s["accuracy"], "val_macro_f1": s["macro_f1"]}
        if alone:
            metrics["val_member_accuracy"] = float(np.mean(torch.cat(alone).cpu().numpy() == truth))
        if len(truth) == len(self.val_labels):
            return {**metrics, "val_examples": len(truth), "val_full": True}
        ones, population = np.ones(len(truth)), len(self.val_labels)
        return {**metrics, "val_sample_examples": len(truth), "val_full": False,
                "val_loss_se": standard_error(losses, ones, population),
                "val_accuracy_se": standard_error((guess == truth).astype(np.float64), ones, population)}


    def _gathered(self, batches: list[np.ndarray], mine: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        """Per-example results of this rank's batches (every processes-th) in the order of `batches`, on every
        rank: zeros where another rank scored, then summed (exact: each entry has one writer)."""
        ends = np.cumsum([len(rows) for rows in batches])
        whole = torch.zeros(int(ends[-1]), dtype=dtype, device=self.device)
        for part, b in zip(mine, range(self.rank, len(batches), self.world)):
            whole[ends[b] - len(part) : ends[b]] = part
        torch.distributed.all_reduce(whole)
        return [whole]


def content_seed(seqs: list[np.ndarray], labels) -> int:
    """A seed drawn from the examples themselves (token ids and labels)."""
    h = hashlib.blake2b(np.asarray(labels, dtype=np.int64).tobytes(), digest_size=8)
    for s in seqs:
        h.update(len(s).to_bytes(4, "little"))
        h.update(np.asarray(s, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


def layer_scaled(optimizer: torch.optim.Optimizer, layers: list[list[nn.Parameter]],
                 decay: float) -> torch.optim.Optimizer:
    """Layer-wise learning-rate decay: `optimizer`, before its first step, with each group split by
    layer (`layers` from the input up), the top layer at the full rate and each one below at `decay`
    times the one above, through the `lr_scale` the loop applies."""
    if isinstance(optimizer, MuonWithAdamW):
        raise UserError("--layer-lr-decay does not combine with --optim muon; choose another optimizer")
    if not 0 < decay <= 1:
        raise UserError(f"--layer-lr-decay must lie in (0, 1], got {decay}")
    depth = {id(p): len(layers) - 1 - i for i, layer in enumerate(layers) for p in layer}
    groups = []
    for group in optimizer.param_groups:
        options = {k: v for k, v in group.items() if k != "params"}
        by_depth: dict[int, list] = {}
        for p in group["params"]:
            by_depth.setdefault(depth[id(p)], []).append(p)
        for d, params in sorted(by_depth.items()):
            groups.append({**options, "params": params, "lr_scale": options.get("lr_scale", 1.0) * decay**d})
    optimizer.param_groups = []
    for group in groups:
        optimizer.add_param_group(group)
    return optimizer
