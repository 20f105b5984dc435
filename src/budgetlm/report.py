"""What a run tells its user on stderr, and the folder it writes to."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from budgetlm.budget import format_duration
from budgetlm.errors import UserError


def say(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun only the first process speaks
        print(text, file=sys.stderr, flush=True)


def default_out() -> Path:
    """A new run's folder when none is given: runs/<timestamp>."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to the output folder {out} ({e.strerror or e}); choose another --out") from None


def say_done(result, out: Path, figures: str, wall_s: float) -> None:
    """The run's last line: its figures, or after a signal how to resume it."""
    if result.stop_reason == "interrupted":
        say(f"stopped at step {result.steps}; best weights so far are in {out}. Resume with the same command "
            f"and --resume auto --out {out}")
    else:
        say(f"done ({result.stop_reason}) in {format_duration(wall_s)}: {figures}; files in {out}")


def run_quietly(run: Callable, cfg, folder: Path) -> None:
    """`run(cfg, folder, quiet=True)` for what it leaves behind (imports, device start, tokenizer training,
    token caches): its output and its folder are thrown away, its errors left for the real runs to report.
    compare and tune warm up with it, so the first run's budget buys as much training as the others'."""
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            run(cfg, folder, quiet=True)
    except UserError:
        pass
    finally:
        shutil.rmtree(folder, ignore_errors=True)
