"""Language modelling as a task for the loop: next-token batches, summed cross-entropy, and
validation loss with bits per byte (total nats ÷ (UTF-8 bytes × ln 2), tokenizer-independent)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from budgetlm.data.tokens import WindowSampler, eval_windows, window_sample
from budgetlm.eval.calibration import Calibration, calibrate
from budgetlm.train.runtime import to_device
from budgetlm.train.selection import standard_error


def evaluate_lm(forward: Callable, tokens: np.ndarray, n_bytes: int, context: int, batch: int,
                device: torch.device, starts: np.ndarray | None = None,
                shard: tuple[int, int] = (0, 1)) -> dict[str, float]:
    """Loss per token, bits per byte and perplexity over the whole stream, or over the windows at
    `starts` (a sample from `window_sample`): bpb then scales the bytes by the share of tokens scored,
    the record says `val_sample_tokens` instead of `val_tokens`, and `val_*_se` give each figure's
    standard error. The sums stay on the device until the end, so a GPU is not made to wait after
    every batch. `shard` (rank, processes): this rank scores every processes-th window and the sums
    are added up across the ranks, which all run as many batches (a sharded model's forward is collective)."""
    n = len(tokens) - 1
    all_starts = np.arange(0, n, context) if starts is None else np.asarray(starts)
    rank, world = shard
    mine = all_starts[rank::world]
    per_rank = -(-len(all_starts) // world)
    # padded with empty windows (at the stream's end: nothing scored) to the same count on every rank
    mine = np.concatenate([mine, np.full(per_rank - len(mine), n, dtype=np.int64)])
    window_nats, window_tokens = [], []
    for x, y in eval_windows(tokens, context, batch, mine):
        y = to_device(y, device)
        nats = forward(to_device(x, device), y, reduction="none").detach().float().view(y.shape)
        window_nats.append(nats.sum(1))
        window_tokens.append((y != -100).sum(1))
    nats, counts = torch.cat(window_nats), torch.cat(window_tokens)
    if world > 1:  # back in the order of the windows, zeros where another rank scored, then summed
        every_nats = torch.zeros(per_rank * world, dtype=nats.dtype, device=nats.device)
        every_counts = torch.zeros(per_rank * world, dtype=counts.dtype, device=counts.device)
        every_nats.view(per_rank, world)[:, rank] = nats[:per_rank]
        every_counts.view(per_rank, world)[:, rank] = counts[:per_rank]
        torch.distributed.all_reduce(every_nats)
        torch.distributed.all_reduce(every_counts)
        nats, counts = every_nats, every_counts
    nats = nats.cpu().double().numpy()  # MPS has no float64
    counts = counts.cpu().numpy()
    scored = counts > 0  # the padding rows of the last batch
    nats, counts = nats[scored], counts[scored]
    total_tokens = int(counts.sum())
    all_tokens = n
    loss = float(nats.sum()) / max(total_tokens, 1)
    per_bit = all_tokens / (n_bytes * math.log(2))  # bits per byte = nats per token × this
    metrics = {"val_loss": loss, "val_bpb": loss * per_bit, "val_ppl": math.exp(min(loss, 50.0))}
    if total_tokens == all_tokens:
        return {**metrics, "val_tokens": total_tokens, "val_full": True}
    se = standard_error(nats, counts, population=math.ceil(all_tokens / context))
    return {**metrics, "val_sample_tokens": total_tokens, "val_full": False, "val_loss_se": se,
            "val_bpb_se": se * per_bit, "val_ppl_se": metrics["val_ppl"] * se}


def sum_nats(forward: Callable, batches, device: torch.device, max_batches: int | None = None) -> tuple[float, int]:
    """(summed nats, predicted tokens) over `batches` of (x, y). The sum is added up on the device, in place, and
    read every `HOST_READ_EVERY` batches, so a GPU is not made to wait after every batch; no batch's result is
    kept (small tensors kept between the batches' freed logits made glibc's heap grow by a batch each)."""
    running = torch.zeros((), dtype=torch.float32, device=device)
    total_nats, total_tokens = 0.0, 0
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        running += forward(to_device(x, device), to_device(y, device), reduction="sum").detach().float()
        total_tokens += int((y != -100).sum())
        if (i + 1) % HOST_READ_EVERY == 0:
            total_nats += float(running)
            running.zero_()
    return total_nats + float(running), total_tokens


HOST_READ_EVERY = 256


def lm_metrics(total_nats: float, total_tokens: int, n_bytes: float) -> dict[str, float]:
    loss = total_nats / max(total_tokens, 1)
    return {"val_loss": loss, "val_bpb": total_nats / (n_bytes * math.log(2)),
            "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": total_tokens}


class WindowBatches:
    """What every task over windows of a token stream does when memory runs out: half the sequences per forward
    pass, twice the micro-steps (the sampler cuts the same windows either way, so the data order is unchanged),
    and half the sequences per evaluation pass (the same numbers)."""
    micro_batch: int
    micro_steps: int
    sampler: WindowSampler
    _eval_micro_batch: int

    context: int

    def consumed(self, batch) -> int:
        """Tokens of text read: whole windows, whatever share of them carries a loss."""
        return len(batch[0]) * self.context

    def halve_micro_batch(self) -> bool:
        if self.micro_batch < 2:
            return False
        self.micro_batch //= 2
        self.micro_steps *= 2
        self.sampler.batch = self.micro_batch
        return True

    def halve_eval_batch(self) -> bool:
        if self._eval_micro_batch < 2:
            return False
        self._eval_micro_batch //= 2
        return True


class LanguageModelTask(WindowBatches):
    unit = "tokens"

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, val_bytes: int, context: int,
                 micro_batch: int, device: torch.device, seed: int = 0, label_smoothing: float = 0.0):
        self.sampler = WindowSampler(train_tokens, context, micro_batch, seed)
        self.val_tokens, self.val_bytes = val_tokens, val_bytes
        self.context, self.micro_batch, self.device = context, micro_batch, device
        self.micro_steps = 1
        self.label_smoothing = label_smoothing
        self._eval_micro_batch = micro_batch  # evaluation keeps its batch shape (and compiled graph)
        self._windows_per_batch = micro_batch  # what the loop's count of evaluation batches means, fixed so
                                               # that halving the batch after running out of memory keeps the sample
        self._samples: dict[int, np.ndarray] = {}
        self.rank, self.world = 0, 1  # under torchrun: this process's share of each step and evaluation

    def batch(self, step: int, micro: int):
        # the ranks' micro-batches, one after the other, are the sequences one process would read in this step
        return self.sampler.batch_at(step, self.rank * self.micro_steps + micro, self.micro_steps * self.world)

    def count(self, batch) -> int:
        return batch[1].numel()

    def loss(self, forward: Callable, batch) -> torch.Tensor:
        x, y = batch
        return forward(x, y, reduction="sum", label_smoothing=self.label_smoothing)

    def eval_batch_count(self) -> int:
        return math.ceil(math.ceil((len(self.val_tokens) - 1) / self.context) / self._windows_per_batch)

    def evaluate(self, forward: Callable, max_batches: int | None) -> dict[str, float]:
        """The whole validation stream (None), or a fixed sample of `max_batches` batches' worth of its
        windows spread over all of it: the same windows at every evaluation of every run on this text."""
        starts = None
        if max_batches is not None and max_batches < self.eval_batch_count():
            count = max_batches * self._windows_per_batch
            if count not in self._samples:
                self._samples[count] = window_sample(self.val_tokens, self.context, count)
            starts = self._samples[count]
        return evaluate_lm(forward, self.val_tokens, self.val_bytes, self.context, self._eval_micro_batch,
                           self.device, starts, shard=(self.rank, self.world))

    def calibrate(self, model) -> Calibration:
        """The temperature of `model` fitted on the validation stream (eval/calibration.py); under no_grad."""
        return calibrate(model, self.val_tokens, self.val_bytes, self.context, self._eval_micro_batch, self.device)
