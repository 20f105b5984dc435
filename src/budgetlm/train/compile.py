"""torch.compile for training, and whether it pays within a budget.

Regional compilation: only the repeated Transformer block is compiled, once; every layer (and every model of the
same shape in the process) runs the same compiled graph, so a cold compile costs about one layer's (a T5's: two
graphs, its encoder's block and its decoder's, which reads the encoder's output). The block sees every position of
the batch whatever the objective, so its shape is the same at every step: a BERT's masked positions, a different
number in each batch, are gathered after it, by the eager head. A GPT's block-wise training loss (models/loss.py) is
a second region: its step over a block of rows (the head's products, softmax and gradient) is compiled once for the
block shape, and once more for a shorter last block. Evaluation, decoding and anything run without gradients stay
eager (a second graph would cost a second compile).

Inductor's caches (its FX graph cache and AOTAutograd's) live in budgetlm's cache folder, one folder per shape,
torch version, device and precision, so the second run of a shape on this machine compiles in seconds. Each folder
also records what compiling measured there (compile seconds, cold and warm; steady tokens/s eager and compiled),
and `decide` compiles when the tokens a faster step gains over the budget exceed those the compile costs."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from budgetlm.data.tokens import cache_dir, remember
from budgetlm.models.blocks import Block
from budgetlm.models.config import ModelConfig
from budgetlm.models.loss import BlockGradients, block_gradients
from budgetlm.train.runtime import can_compile

# What compiling costs and buys where nothing has been measured on this machine yet. Seconds to compile the block
# (forward and backward), in a fresh process, with an empty cache and with a filled one; the steady speed-up of a
# training step. CPU: the lowest compiled/eager ratio measured at the reference and tinyshakespeare shapes on 2-core
# EPYC and Xeon machines (1.12-1.55, docs/performance.md), so an unmeasured shape compiles only where it clearly pays.
DEFAULT_COMPILE_S = {"cpu": {"cold": 25.0, "warm": 5.0}, "cuda": {"cold": 40.0, "warm": 8.0}}
DEFAULT_SPEEDUP = {"cpu": 1.2, "cuda": 1.3}
# A cold compile fills the cache for every later run of the shape (seeds, re-runs, the same plan): where it would
# pay with the cache filled, it is worth up to this share of the tokens of the run that fills it, so a first short
# run of a shape warms the cache for the ones after it. 0 makes the rule strictly this run's tokens.
INVESTMENT = 0.25
RECORD = "record.json"
KEEP_COMPILE_TIMES = 9  # the latest compile times kept per shape and cache state (their median is expected)


@dataclass(frozen=True)
class CompileCache:
    """One shape's folder of compiled code and of what compiling measured there."""

    path: Path

    @property
    def inductor_dir(self) -> Path:
        return self.path / "inductor"

    def record(self) -> dict:
        try:
            return json.loads((self.path / RECORD).read_text())
        except (OSError, ValueError):
            return {}

    def is_warm(self) -> bool:
        """True once a compile of this shape finished here (its graphs are in the cache)."""
        return bool(self.record().get("compile_s"))

    def note_compile(self, seconds: float, warm: bool) -> None:
        def add(record):
            times = record.setdefault("compile_s", {}).setdefault("warm" if warm else "cold", [])
            times[:] = (times + [round(seconds, 2)])[-KEEP_COMPILE_TIMES:]
        self._update(add)

    def note_speed(self, compiled: bool, tokens_per_s: float) -> None:
        """Keep the best steady tokens/s seen at this shape, eager or compiled (as plan.device_peak keeps the best
        matmul speed: a moment of load elsewhere should not change later decisions)."""
        if not tokens_per_s > 0:
            return
        kind = "compiled" if compiled else "eager"

        def best(record):
            speeds = record.setdefault("tokens_per_s", {})
            speeds[kind] = round(max(tokens_per_s, speeds.get(kind, 0.0)), 1)
        self._update(best)

    def _update(self, change: Callable[[dict], None]) -> None:
        record = self.record()
        change(record)
        remember(self.path / RECORD, record)


def device_key(device: torch.device) -> str:
    """The compiled code's device: the GPU's name, or the CPU's instruction set (what Inductor generates code
    for) and thread count (what the recorded speeds depend on)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"{device.type}-{torch.backends.cpu.get_cpu_capability()}-{torch.get_num_threads()}threads"


def compile_cache(config: ModelConfig, micro_batch: int, device: torch.device, precision: str) -> CompileCache:
    """The cache folder of this model shape (every field of its config), micro-batch, precision, device and torch
    version: a change of any of them compiles other graphs."""
    fields = json.dumps({"model": config.to_dict(), "micro_batch": micro_batch}, sort_keys=True)
    digest = hashlib.sha256(fields.encode()).hexdigest()[:12]
    c = config
    shape = f"{c.n_layer}x{c.d_model}-ctx{c.context}-vocab{c.vocab_size}-batch{micro_batch}-{precision}-{digest}"
    return CompileCache(cache_dir() / "compile" / f"torch{torch.__version__}" / device_key(device) / shape)


def device_records(cache: CompileCache) -> list[dict]:
    """The records of every shape compiled on this device with this torch."""
    records = []
    for path in sorted(cache.path.parent.glob(f"*/{RECORD}")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return records


def expected_compile_s(cache: CompileCache, device: torch.device, warm: bool | None = None) -> tuple[float, str]:
    """Seconds the compile should take, and where the figure comes from: the compiles measured at this shape with
    its cache as it is (or as `warm` says), else those measured at any shape on this device, else the default."""
    kind = "warm" if (cache.is_warm() if warm is None else warm) else "cold"
    here = cache.record().get("compile_s", {}).get(kind, [])
    if here:
        return statistics.median(here), f"{kind} cache, measured at this shape"
    anywhere = [s for r in device_records(cache) for s in r.get("compile_s", {}).get(kind, [])]
    if anywhere:
        return statistics.median(anywhere), f"{kind} cache, measured at other shapes here"
    return DEFAULT_COMPILE_S.get(device.type, DEFAULT_COMPILE_S["cuda"])[kind], f"{kind} cache, default"


def expected_speedup(cache: CompileCache, device: torch.device) -> tuple[float, str]:
    """Compiled ÷ eager steady tokens/s: measured at this shape where both were recorded, else the default."""
    speeds = cache.record().get("tokens_per_s", {})
    if speeds.get("eager") and speeds.get("compiled"):
        return speeds["compiled"] / speeds["eager"], "measured at this shape"
    return DEFAULT_SPEEDUP.get(device.type, DEFAULT_SPEEDUP["cuda"]), "default"


def tokens_ratio(budget_s: float, compile_s: float, speedup: float) -> float:
    """Tokens trained in `budget_s` compiled ÷ eager: speedup·(budget − compile) ÷ budget."""
    return speedup * max(budget_s - compile_s, 0.0) / budget_s


@dataclass
class CompileDecision:
    compile: bool
    reason: str  # one line for the run's log and the plan's output
    cache: CompileCache


def decide(mode: str, config: ModelConfig, micro_batch: int, device: torch.device, precision: str,
           budget_s: float | None, processes: int = 1) -> CompileDecision:
    """Whether to compile this shape for a run of `budget_s` seconds (None: no time budget). `mode` is --compile:
    off, on, or auto (compile where the tokens gained exceed the tokens the compile costs)."""
    cache = compile_cache(config, micro_batch, device, precision)  # an eager run records its speed there too
    if mode == "off":
        return CompileDecision(False, "eager (--compile off)", cache)
    if processes > 1:
        return CompileDecision(False, "eager: compiling under torchrun is not built yet (each process would compile "
                               "its own copy)", cache)
    reason = can_compile()
    if reason:
        return CompileDecision(False, f"eager: {reason}", cache)
    if mode == "on":
        return CompileDecision(True, "compiled (--compile on)", cache)
    compile_s, cost_source = expected_compile_s(cache, device)
    speedup, speed_source = expected_speedup(cache, device)
    figures = f"compile about {compile_s:.0f}s ({cost_source}), step ×{speedup:.2f} ({speed_source})"
    if budget_s is None:  # as before the rule: runs of steps or tokens compile on a GPU only
        if device.type == "cuda":
            return CompileDecision(True, f"compiled: no time budget, on a GPU ({figures})", cache)
        return CompileDecision(False, f"eager: no time budget to weigh the compile against ({figures})", cache)
    ratio = tokens_ratio(budget_s, compile_s, speedup)
    if ratio > 1:
        return CompileDecision(True, f"compiled: {ratio - 1:.0%} more tokens in {budget_s:.0f}s ({figures})", cache)
    if not cache.is_warm() and ratio >= 1 - INVESTMENT:
        warm_s = expected_compile_s(cache, device, warm=True)[0]
        if tokens_ratio(budget_s, warm_s, speedup) > 1:
            return CompileDecision(True, f"compiled to fill the cache: {1 - ratio:.0%} fewer tokens in {budget_s:.0f}s "
                                   f"now, more in later runs of this shape ({figures})", cache)
    return CompileDecision(False, f"eager: compiling would cost {1 - ratio:.0%} of the tokens in {budget_s:.0f}s "
                           f"({figures})", cache)


_compiled_forwards: dict[type, Callable] = {}
_training_classes: dict[type, type] = {}


def _training_compiled(cls: type) -> type:
    """A subclass of block class `cls` whose training forward (gradients on, no decoding cache) runs one compiled
    graph shared by every instance; anything else runs `cls.forward` eagerly. A subclass rather than a wrapper, so
    the state dict keeps its keys and a copy of the model (the moving average's) runs its own weights."""
    if cls not in _training_classes:
        # dynamic=False: one static graph for the run's one batch shape, no symbolic shapes to guard and slow it
        compiled = _compiled_forwards.setdefault(cls, torch.compile(cls.forward, dynamic=False))

        def forward(self, *args, **kwargs):
            if self.training and torch.is_grad_enabled() and kwargs.get("cache") is None:
                return compiled(self, *args, **kwargs)
            return cls.forward(self, *args, **kwargs)

        _training_classes[cls] = type(f"Compiled{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _training_classes[cls]


def compile_blocks(model: nn.Module, cache: CompileCache | None = None) -> int:
    """Compile the training forward of every Transformer block of `model` in place (regional compilation), with
    Inductor's caches in `cache`'s folder. Returns the number of blocks."""
    if cache is not None:
        cache.inductor_dir.mkdir(parents=True, exist_ok=True)
        # Inductor reads its cache folder from the environment at each compile; AOTAutograd's cache lies under it
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache.inductor_dir)
    blocks = [m for m in model.modules() if type(m) is Block]
    for block in blocks:
        block.__class__ = _training_compiled(Block)
    return len(blocks)


@functools.cache
def compiled_loss_blocks() -> BlockGradients:
    """The block-wise loss's step (models/loss.block_gradients) compiled, one copy for the process: a second
    torch.compile of it would compile its graphs again."""
    # dynamic=False: static graphs, one for the run's block of rows and one for a shorter last block if the rows
    # do not divide evenly (compiled once, as a padded block would cost its padding every step)
    return torch.compile(block_gradients, dynamic=False)


def compile_loss(model: nn.Module) -> None:
    """Give `model` the compiled step of its block-wise training loss, where it has one (models/gpt.py)."""
    if hasattr(model, "loss_blocks"):
        model.loss_blocks = compiled_loss_blocks()


def timed_first_step(step: Callable[[], None], cache: CompileCache | None) -> float:
    """Run `step` (a forward and backward on a batch of the training shape, which compiles), record how long it
    took in `cache` (warm or cold), and return the seconds."""
    warm = cache is not None and cache.is_warm()
    started = time.perf_counter()
    step()
    seconds = time.perf_counter() - started
    if cache is not None:
        cache.note_compile(seconds, warm)
    return seconds


def compile_training_step(model: nn.Module, cache: CompileCache | None, batch: tuple[torch.Tensor, ...],
                          loss: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor],
                          autocast: Callable) -> float:
    """Compile `model`'s blocks and compile them now, on a forward and backward of `batch` (one of the training
    shape, on the model's device) through `loss(model, batch)`, the training objective's own (a task's `loss`),
    its gradients dropped: the compile is timed and recorded apart from training. The GPT's loss step is compiled
    too. Returns the seconds."""
    compile_blocks(model, cache)
    compile_loss(model)

    def step():
        with autocast():
            value = loss(model, batch)
        value.backward()
        model.zero_grad(set_to_none=True)

    return timed_first_step(step, cache)


def compile_language_model(model: nn.Module, cache: CompileCache | None, micro_batch: int, context: int,
                           autocast: Callable) -> float:
    """`compile_training_step` on a next-token batch of zeros of the training shape: a GPT's, where no task
    gives a batch (the benchmarks). Returns the seconds."""
    device = next(model.parameters()).device
    tokens = torch.zeros(micro_batch, context, dtype=torch.long, device=device)
    return compile_training_step(model, cache, (tokens, tokens), lambda forward, batch: forward(*batch), autocast)
