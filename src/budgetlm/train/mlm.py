"""Masked language modelling as a task for the loop (BERT): windows of the token stream with a share of their
positions masked, 80% replaced by [MASK], 10% by a random token and 10% kept (Devlin et al. 2019); the loss and
the validation figures (masked-token loss and accuracy) are over the masked positions only. Bits per byte are
not defined for this objective, so none are reported."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from budgetlm.data.tokens import WindowSampler, window_sample
from budgetlm.train.lm import WindowBatches
from budgetlm.train.runtime import to_device


def mask_tokens(x: torch.Tensor, rate: float, mask_id: int, random_below: int, generator: torch.Generator,
                keep: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted input, targets) for a batch of token ids: each position is picked with probability `rate`
    (never one of the ids in `keep`, and at least one per row); a picked position becomes `mask_id` 80% of the
    time, a random id below `random_below` 10%, and stays 10%. Targets hold the original id at the picked
    positions and -100 elsewhere."""
    draw = torch.rand(x.shape, generator=generator)
    candidates = torch.ones_like(x, dtype=torch.bool)
    for token in keep:
        candidates &= x != token
    picked = (draw < rate) & candidates
    # a row with nothing picked would add no loss: pick its likeliest candidate instead
    empty = ~picked.any(1)
    if empty.any():
        first = torch.where(candidates, draw, 2.0).argmin(1)
        picked[empty, first[empty]] = candidates[empty, first[empty]]
    how = torch.rand(x.shape, generator=generator)
    replaced = torch.randint(0, random_below, x.shape, generator=generator)
    corrupted = torch.where(picked & (how < 0.8), mask_id, x)
    corrupted = torch.where(picked & (how >= 0.8) & (how < 0.9), replaced, corrupted)
    return corrupted, torch.where(picked, x, -100)


def batch_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The masks' random stream for one micro-batch, keyed by (seed, step, micro): a resumed run draws the same."""
    key = np.random.SeedSequence([seed, step, micro]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(key))


EVAL_SEED = 1234  # validation masks: fixed, the same at every evaluation of every run on this text


class MaskedLMTask(WindowBatches):
    unit = "tokens"  # of text read; `count`: the masked ones, which carry the loss

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, context: int, micro_batch: int,
                 device: torch.device, *, mask_rate: float, mask_id: int, random_below: int,
                 keep: tuple[int, ...] = (), seed: int = 0, label_smoothing: float = 0.0):
        self.sampler = WindowSampler(train_tokens, context, micro_batch, seed)
        self.val_tokens, self.context, self.micro_batch, self.device = val_tokens, context, micro_batch, device
        self.mask_rate, self.mask_id, self.random_below, self.keep = mask_rate, mask_id, random_below, keep
        self.seed, self.label_smoothing = seed, label_smoothing
        self.micro_steps = 1
        self._eval_micro_batch = self._windows_per_batch = micro_batch

    def batch(self, step: int, micro: int):
        x, _ = self.sampler.batch_at(step, micro, self.micro_steps)
        return mask_tokens(x, self.mask_rate, self.mask_id, self.random_below, batch_generator(self.seed, step, micro),
                           self.keep)

    def count(self, batch) -> int:
        return int((batch[1] != -100).sum())

    def loss(self, forward: Callable, batch) -> torch.Tensor:
        x, y = batch
        return forward(x, y, reduction="sum", label_smoothing=self.label_smoothing)

    def _windows(self) -> int:
        return (len(self.val_tokens) - 1) // self.context

    def eval_batch_count(self) -> int:
        return math.ceil(self._windows() / self._windows_per_batch)

    def evaluate(self, forward: Callable, max_batches: int | None) -> dict[str, float]:
        """Masked-token loss and accuracy over whole windows of the validation stream (all, or a fixed sample of
        `max_batches` batches' worth), each masked by a generator seeded by its start: the same masks every time."""
        count = self._windows() if max_batches is None else min(self._windows(), max_batches * self._windows_per_batch)
        starts = window_sample(self.val_tokens[: self._windows() * self.context + 1], self.context, count)
        nats, right, total = [], [], 0
        model = getattr(forward, "_orig_mod", forward)
        for i in range(0, len(starts), self._eval_micro_batch):
            rows = [torch.from_numpy(self.val_tokens[s : s + self.context].astype(np.int64))
                    for s in starts[i : i + self._eval_micro_batch]]
            masked = [mask_tokens(r[None], self.mask_rate, self.mask_id, self.random_below,
                                  batch_generator(EVAL_SEED, int(s), 0), self.keep)
                      for r, s in zip(rows, starts[i : i + self._eval_micro_batch])]
            x = to_device(torch.cat([m[0] for m in masked]), self.device)
            y = to_device(torch.cat([m[1] for m in masked]), self.device)
            h = model.hidden(x)
            picked = y != -100
            logits = model.logits(h[picked]).float()
            nats.append(torch.nn.functional.cross_entropy(logits, y[picked], reduction="sum"))
            right.append((logits.argmax(-1) == y[picked]).sum())
            total += int(picked.sum())
        loss = float(torch.stack(nats).sum()) / max(total, 1)
        return {"val_loss": loss, "val_mlm_accuracy": float(torch.stack(right).sum()) / max(total, 1),
                "val_masked_tokens": total, "val_full": count == self._windows()}
