"""The budget: durations like "5m", the run's clock, progress through the budget, and the deadline.

Progress is max(step / planned steps, tokens / max tokens, elapsed / time budget), so a schedule keyed
on it reaches its end exactly when the first limit is hit (as Cramming does for time)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from budgetlm.errors import UserError

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|h|m|s)")


def parse_duration(text: str | float | int) -> float:
    """Seconds in "90s", "5m", "1h30m", "2.5h" or a bare number of seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        s = text.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", s):
            seconds = float(s)
        elif s and _PART.sub("", s) == "":
            seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(s))
        else:
            raise UserError(f"cannot read the duration {text!r}: write it like 90s, 5m, 1h30m or 2.5h")
    if seconds <= 0:
        raise UserError(f"duration {text!r} must be positive")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class Budget:
    """Limits of one run. `spent_s` carries the time of earlier sessions of a resumed run."""

    seconds: float | None = None
    max_steps: int | None = None
    max_tokens: int | None = None
    spent_s: float = 0.0
    _start: float = field(default_factory=time.monotonic, repr=False)

    def __post_init__(self):
        if self.seconds is None and self.max_steps is None and self.max_tokens is None:
            raise UserError("give a limit: --budget (e.g. 5m), --max-steps or --max-tokens")

    def elapsed(self) -> float:
        return self.spent_s + time.monotonic() - self._start

    def remaining(self) -> float | None:
        return None if self.seconds is None else self.seconds - self.elapsed()

    def progress(self, step: int, tokens: int, reserve_s: float = 0.0, clock: str = "time",
                 step_s: float | None = None) -> float:
        """Fraction of the budget used, in [0, 1]. `reserve_s` is time kept back for the final
        evaluation and save, so the schedule ends when training must end. With clock="steps" a time
        budget counts optimizer steps against the number it affords at the measured step time."""
        parts = [0.0]
        if self.max_steps:
            parts.append(step / self.max_steps)
        if self.max_tokens:
            parts.append(tokens / self.max_tokens)
        if self.seconds:
            training_s = max(self.seconds - reserve_s, 1e-9)
            if clock == "time":
                parts.append(self.elapsed() / training_s)
            elif step_s:
                planned = step + max(training_s - self.elapsed(), 0.0) / step_s
                parts.append(step / max(planned, 1e-9))
        return min(1.0, max(parts))

    def describe(self, epochs: float | None = None) -> str:
        """"5m00s / 1000 steps": the limits of this run."""
        parts = []
        if self.seconds:
            parts.append(format_duration(self.seconds))
        if self.max_steps:
            parts.append(f"{self.max_steps} steps")
        if epochs:
            parts.append(f"{epochs:g} epochs")
        elif self.max_tokens:
            parts.append(f"{self.max_tokens:,} tokens")
        return " / ".join(parts)

    def exhausted(self, step: int, tokens: int, *, next_step_s: float = 0.0, reserve_s: float = 0.0) -> str | None:
        """Why training must stop now, or None. A step that would end past the deadline is not begun."""
        if self.max_steps is not None and step >= self.max_steps:
            return "max_steps"
        if self.max_tokens is not None and tokens >= self.max_tokens:
            return "max_tokens"
        if self.seconds is not None and self.elapsed() + next_step_s + reserve_s >= self.seconds:
            return "budget"
        return None
