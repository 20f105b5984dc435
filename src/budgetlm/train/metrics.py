"""What a run reports: metrics.jsonl records, a live progress line, and the loss plot."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm
from tqdm.notebook import tqdm_notebook

from budgetlm.budget import format_duration
from budgetlm.eval.validation import final_label, final_record, validation_label

# tqdm.auto draws a widget in a Jupyter kernel, whose stderr is no terminal but shows a live bar
IN_NOTEBOOK = issubclass(tqdm, tqdm_notebook)


class RunLog:
    """Appends one JSON record per log or evaluation to metrics.jsonl and keeps a progress bar on
    stderr (a plain line per record when stderr is not a terminal)."""

    def __init__(self, path: Path | None, *, quiet: bool = False, resume_step: int | None = None, tracker=None):
        """A fresh log, or with `resume_step` the existing one cut back to that step (records of steps
        after the checkpoint are redone by the resumed run). `tracker` (budgetlm.tracking) gets every record."""
        self.path = path
        self.tracker = tracker
        self.records: list[dict] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() and resume_step is not None:
                for line in path.read_text().splitlines():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a kill
                        continue
                    if record.get("step", 0) <= resume_step:
                        self.records.append(record)
                path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            elif path.exists():
                path.unlink()
        self.quiet = quiet
        self.tty = sys.stderr.isatty() or IN_NOTEBOOK
        self.bar = tqdm(total=1000, file=sys.stderr, dynamic_ncols=True, leave=True, disable=quiet or not self.tty,
                        bar_format="{l_bar}{bar}| {postfix}")
        self._shown = 0
        self._last_line = 0.0
        self._last_loss: float | None = None

    def record(self, **fields) -> None:
        fields = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in fields.items()}
        self.records.append(fields)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(fields) + "\n")
        if self.tracker is not None:
            self.tracker.log(fields)

    def show(self, progress: float, *, loss: float | None, val: str | None, rate: float, unit: str = "tokens",
             left_s: float | None, force: bool = False) -> None:
        """Update the progress line: loss, latest validation figure, throughput, time left. Without a
        new loss (an evaluation's line) the last one is repeated, so every printed line carries one."""
        loss = self._last_loss = loss if loss is not None else self._last_loss
        parts = []
        if loss is not None:
            parts.append(f"loss {loss:.3f}")
        if val:
            parts.append(val)
        parts.append(f"{rate:,.0f} {'tok' if unit == 'tokens' else 'ex'}/s")
        if left_s is not None:
            parts.append(f"{format_duration(left_s)} left")
        text = " | ".join(parts)
        if self.quiet:
            return
        if self.tty:
            self.bar.set_postfix_str(text, refresh=False)
            ticks = int(progress * 1000)
            self.bar.update(max(0, ticks - self._shown))
            self._shown = max(self._shown, ticks)
        elif force or time.monotonic() - self._last_line > 10:
            self._last_line = time.monotonic()
            print(f"[{progress * 100:5.1f}%] {text}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not self.quiet:
            (self.bar.write if self.tty else print)(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def plot_losses(records: list[dict], path: Path, title: str = "") -> None:
    """Train and validation loss against tokens and against time, side by side; the final evaluation
    of the kept weights on the whole validation split is a labelled star at the end."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("train_loss") is not None]
    val = [r for r in records if r.get("val_loss") is not None and r.get("kind") != "final"]
    final = final_record(records)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, label in ((axes[0], "tokens", "training tokens"), (axes[1], "elapsed_s", "wall-clock seconds")):
        if train:
            ax.plot([r[key] for r in train], [r["train_loss"] for r in train], label="train", lw=1, alpha=0.8)
        if val:
            ax.plot([r[key] for r in val], [r["val_loss"] for r in val], "o-", label=validation_label(val), ms=3)
        if final is not None:
            ax.plot([final[key]], [final["val_loss"]], "*", ms=13, color="C3", label=final_label(final))
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats per token)")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
