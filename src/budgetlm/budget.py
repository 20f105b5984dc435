"""The budget: durations like "5m", the run's clock, progress through the budget, and the deadline.

Progress is max(step / planned steps, tokens / max tokens, elapsed / time budget), so a schedule keyed
on it reaches its end exactly when the first limit is hit (as Cramming does for time)."""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

from budgetlm.errors import UserError

# in exact fractions, so hours, minutes and seconds add up to the very float a duration was written from
_UNITS = {"h": Fraction(3600), "m": Fraction(60), "s": Fraction(1), "ms": Fraction(1, 1000)}
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
_PART = re.compile(rf"({_NUMBER})\s*(ms|h|m|s)")
_HOW = "write it like 90s, 5m, 1h30m or 2.5h"


def _seconds(parts: list[tuple[str, str]]) -> float:
    """The float nearest the sum of (number, unit) parts; inf past a float's range (or Python's 4300 digits)."""
    try:
        return float(sum(Fraction(n) * _UNITS[u] for n, u in parts))
    except (OverflowError, ValueError):
        return math.inf


def parse_duration(text: str | float | int) -> float:
    """Seconds in "90s", "5m", "1h30m", "2.5h" or a bare number of seconds: finite and positive."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise UserError(f"cannot read the duration {text!r}: {_HOW}")
    if isinstance(text, str):
        s = text.strip().lower().replace(" ", "")
        if re.fullmatch(_NUMBER, s):
            seconds = _seconds([(s, "s")])
        elif s and _PART.sub("", s) == "":
            seconds = _seconds(_PART.findall(s))
        else:
            raise UserError(f"cannot read the duration {text!r}: {_HOW}")
    else:
        try:
            seconds = float(text)
        except OverflowError:
            seconds = math.inf
    if not 0 < seconds < math.inf:
        raise UserError(f"duration {text!r} must be positive and finite: {_HOW}")
    return seconds


def exact_text(number: float) -> str:
    """The shortest plain decimal ("0.001", "90") that reads back as exactly `number`."""
    return format(Decimal(repr(float(number))).normalize(), "f")


def seconds_text(seconds: float) -> str:
    """"90s", "0.25s": a duration as text that parse_duration reads back as exactly `seconds`."""
    return exact_text(seconds) + "s"


def process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere): what a command's start-up (interpreter, imports)
    took before a workflow's clock began, which its user's wall clock counts."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


HIGHER_IS_BETTER = {"val_accuracy", "val_macro_f1"}


@dataclass(frozen=True)
class Every:
    """An interval: every `steps` optimizer steps, or every `seconds` of the budget's clock."""
    steps: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text) -> "Every":
        """"100" → every 100 steps; "30s" → every 30 seconds."""
        if isinstance(text, Every):
            return text
        if isinstance(text, int) and not isinstance(text, bool):
            text = str(text)
        if not isinstance(text, str):
            raise UserError(f"an interval must be a number of steps or a duration like 30s, not {text!r}")
        if re.fullmatch(r"[0-9]+", text.strip()):
            if int(text) < 1:
                raise UserError(f"an interval of {text} steps must be at least 1")
            return cls(steps=int(text))
        return cls(seconds=parse_duration(text))

    def __str__(self) -> str:
        return str(self.steps) if self.steps else seconds_text(self.seconds)


@dataclass(frozen=True)
class EarlyStop:
    """Keep the best weights by `metric`; stop after `patience` evaluations without an improvement of at
    least `min_delta` (patience 0: never stop)."""
    metric: str = "val_loss"
    patience: int = 0
    min_delta: float = 0.0

    @property
    def mode(self) -> str:
        return "max" if self.metric in HIGHER_IS_BETTER else "min"

    @classmethod
    def parse(cls, text) -> "EarlyStop":
        """"val_bpb,3,0.001" → EarlyStop("val_bpb", 3, 0.001)."""
        if isinstance(text, EarlyStop):
            return text
        parts = [p.strip() for p in str(text).split(",")]
        try:
            if not 2 <= len(parts) <= 3 or not parts[0]:
                raise ValueError
            rule = cls(parts[0], int(parts[1]), float(parts[2]) if len(parts) == 3 else 0.0)
        except ValueError:
            raise UserError(f"--early-stop {text!r}: write metric,patience[,min_delta], e.g. val_bpb,3,0.001") from None
        if rule.patience < 0 or not 0 <= rule.min_delta < math.inf:
            raise UserError(f"--early-stop {text!r}: patience must not be negative and min_delta must be a finite "
                            "number >= 0")
        return rule

    def __str__(self) -> str:
        return f"{self.metric},{self.patience},{exact_text(self.min_delta)}"


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
    max_flops: float | None = None      # model FLOPs: tokens × flops_per_token, set once the model is built
    flops_per_token: float = 0.0
    spent_s: float = 0.0
    _start: float = field(default_factory=time.monotonic, repr=False)

    def __post_init__(self):
        if self.seconds is None and self.max_steps is None and self.max_tokens is None and self.max_flops is None:
            raise UserError("give a limit: --budget (e.g. 5m), --budget-flops, --max-steps or --max-tokens")

    def flops(self, tokens: float) -> float:
        """Model FLOPs of training on `tokens` tokens."""
        return tokens * self.flops_per_token

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
        if self.max_flops and self.flops_per_token:
            parts.append(self.flops(tokens) / self.max_flops)
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
        if self.max_flops:
            parts.append(f"{self.max_flops:.3g} FLOPs")
        return " / ".join(parts)

    def exhausted(self, step: int, tokens: int, *, next_step_s: float = 0.0, reserve_s: float = 0.0) -> str | None:
        """Why training must stop now, or None. A step that would end past the deadline is not begun."""
        if self.max_steps is not None and step >= self.max_steps:
            return "max_steps"
        if self.max_tokens is not None and tokens >= self.max_tokens:
            return "max_tokens"
        if self.max_flops is not None and self.flops_per_token:
            # the step that ends nearest the budget is the last: half a step past it at most
            next_tokens = tokens / step if step else 0.0
            if self.flops(tokens + next_tokens / 2) >= self.max_flops:
                return "max_flops"
        if self.seconds is not None and self.elapsed() + next_step_s + reserve_s >= self.seconds:
            return "budget"
        return None
