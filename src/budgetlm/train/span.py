"""Span corruption as a task for the loop (T5, Raffel et al. 2020; as nanoT5 does it): a fixed share of each
window's tokens is dropped in spans of a mean length, each span replaced by one sentinel in the encoder's input;
the decoder writes each sentinel followed by the tokens it stands for, and one more sentinel to end. Every window
of a length gets the same number of dropped tokens and spans, so inputs and targets need no padding."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from budgetlm.data.tokens import WindowSampler, window_sample
from budgetlm.models.t5 import MEAN_SPAN, NOISE_DENSITY
from budgetlm.train.lm import WindowBatches
from budgetlm.train.runtime import to_device


def span_counts(length: int, noise: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN) -> tuple[int, int]:
    """(dropped tokens, spans) for a window of `length` tokens."""
    dropped = min(max(round(length * noise), 1), length - 1)
    return dropped, max(1, round(dropped / mean_span))


def _segments(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`total` cut into `parts` non-empty lengths at random."""
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else np.array([], int)
    return np.diff(np.concatenate(([0], cuts, [total])))


def corrupt_spans(tokens: np.ndarray, sentinels: np.ndarray, rng: np.random.Generator,
                  noise: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN) -> tuple[np.ndarray, np.ndarray]:
    """(encoder input, decoder target) for one window: kept runs and dropped spans alternate, starting with a kept
    run; the input has sentinel i where span i was, the target is sentinel i + span i for each span, then the
    next sentinel (the end)."""
    dropped, spans = span_counts(len(tokens), noise, mean_span)
    if spans + 1 > len(sentinels):
        raise ValueError(f"{spans} spans need {spans + 1} sentinels; the tokenizer has {len(sentinels)}")
    kept_lengths = _segments(len(tokens) - dropped, spans, rng)
    dropped_lengths = _segments(dropped, spans, rng)
    inputs, targets, at = [], [], 0
    for i, (kept, gone) in enumerate(zip(kept_lengths, dropped_lengths)):
        inputs += [tokens[at : at + kept], sentinels[i : i + 1]]
        targets += [sentinels[i : i + 1], tokens[at + kept : at + kept + gone]]
        at += kept + gone
    targets.append(sentinels[spans : spans + 1])
    return np.concatenate(inputs).astype(np.int64), np.concatenate(targets).astype(np.int64)


def corrupt_batch(rows: np.ndarray, sentinels: np.ndarray, start_id: int, rng: np.random.Generator):
    """(encoder inputs, decoder inputs, decoder targets) for a batch of equal-length windows; the decoder reads
    `start_id` then the targets shifted by one."""
    pairs = [corrupt_spans(r, sentinels, rng) for r in rows]
    src = torch.from_numpy(np.stack([p[0] for p in pairs]))
    targets = torch.from_numpy(np.stack([p[1] for p in pairs]))
    dec_in = torch.cat((torch.full((len(rows), 1), start_id, dtype=torch.int64), targets[:, :-1]), dim=1)
    return src, dec_in, targets


EVAL_SEED = 1234


class SpanCorruptionTask(WindowBatches):
    unit = "tokens"  # of text read; `count`: the decoder's targets, which carry the loss

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, context: int, micro_batch: int,
                 device: torch.device, *, sentinels: np.ndarray, start_id: int, seed: int = 0,
                 label_smoothing: float = 0.0):
        self.sampler = WindowSampler(train_tokens, context, micro_batch, seed)
        self.val_tokens, self.context, self.micro_batch, self.device = val_tokens, context, micro_batch, device
        self.sentinels, self.start_id, self.seed, self.label_smoothing = sentinels, start_id, seed, label_smoothing
        self.micro_steps = 1
        self._eval_micro_batch = self._windows_per_batch = micro_batch

    def batch(self, step: int, micro: int):
        x, _ = self.sampler.batch_at(step, micro, self.micro_steps)
        # the spans' random stream is keyed by (seed, step, micro): a resumed run draws the same
        return corrupt_batch(x.numpy(), self.sentinels, self.start_id, np.random.default_rng([self.seed, step, micro]))

    def count(self, batch) -> int:
        return batch[2].numel()

    def loss(self, forward: Callable, batch) -> torch.Tensor:
        src, dec_in, targets = batch
        return forward(src, dec_in, targets, reduction="sum", label_smoothing=self.label_smoothing)

    def _windows(self) -> int:
        return (len(self.val_tokens) - 1) // self.context

    def eval_batch_count(self) -> int:
        return math.ceil(self._windows() / self._windows_per_batch)

    def evaluate(self, forward: Callable, max_batches: int | None) -> dict[str, float]:
        """Target-token loss and accuracy (teacher-forced) over whole validation windows, all or a fixed sample,
        each corrupted by a generator seeded by its start: the same spans every time."""
        count = self._windows() if max_batches is None else min(self._windows(), max_batches * self._windows_per_batch)
        starts = window_sample(self.val_tokens[: self._windows() * self.context + 1], self.context, count)
        model = getattr(forward, "_orig_mod", forward)
        nats, right, total = [], [], 0
        for i in range(0, len(starts), self._eval_micro_batch):
            parts = [corrupt_batch(np.asarray(self.val_tokens[s : s + self.context])[None], self.sentinels,
                                   self.start_id, np.random.default_rng([EVAL_SEED, int(s)]))
                     for s in starts[i : i + self._eval_micro_batch]]
            src, dec_in, targets = (to_device(torch.cat(t), self.device) for t in zip(*parts))
            logits = model(src, dec_in).float()
            nats.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
            right.append((logits.argmax(-1) == targets).sum())
            total += targets.numel()
        loss = float(torch.stack(nats).sum()) / max(total, 1)
        return {"val_loss": loss, "val_span_accuracy": float(torch.stack(right).sum()) / max(total, 1),
                "val_target_tokens": total, "val_full": count == self._windows()}
