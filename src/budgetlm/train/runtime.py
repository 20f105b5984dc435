"""Where and how the model runs: device, precision (autocast), threads and torch.compile.

These wrap the model from outside, so the model files stay plain descriptions of the network."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from dataclasses import dataclass

import torch

from budgetlm.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX). Without it PyTorch
    emulates bf16 matmuls, about 100× slower than fp32 (measured on an AVX2 EPYC)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def pick_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu":
            return "bf16" if cpu_has_fast_bf16() else "fp32"
        return "fp32"
    if requested == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs a GPU (CPUs have no fast fp16 training path); use bf16 or fp32")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU has no bf16 support; use fp16 or fp32")
    if requested == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        print("warning: this CPU has no bf16 instructions (AVX-512 BF16 or AMX); bf16 will be emulated "
              "and far slower than fp32", file=sys.stderr)
    return requested


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype a precision name ("fp32", "bf16", "fp16") computes in."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def autocast(device: torch.device, precision: str):
    """Mixed precision: fp32 master weights, matmuls in bf16/fp16."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision_dtype(precision))


def set_threads(threads: int | None = None) -> int:
    """Threads for PyTorch's CPU kernels: the given number, else OMP_NUM_THREADS, else one per core
    this process may run on."""
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:
            threads = os.cpu_count() or 1
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Tell glibc's malloc to keep freed memory for the next allocation instead of handing it back to
    the OS. By default it maps large tensors afresh and gives a freed heap top back once it exceeds 64 MB
    at most, so a training step, which frees more than that at its end, page-faults its activations in
    anew every step: about 40,000 faults a step at the benchmark's reference shape, about 3 µs each in a
    VM; without them 4-55% more tokens/s in alternating runs (docs/performance.md). The process keeps
    its peak memory instead. A process-wide choice, so the command line makes it (cli.main), not a library
    import. True where the setting took (Linux with glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, say)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def can_compile() -> str | None:
    """None when torch.compile can run here, else the reason it cannot."""
    if sys.platform == "win32":
        return "torch.compile is not supported on Windows"
    if not hasattr(torch, "compile"):
        return "this PyTorch has no torch.compile"
    import shutil
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "g++")):
        return "no C/C++ compiler found (Inductor needs one on CPU)"
    return None


def should_compile(mode: str, device: torch.device, budget_s: float | None = None) -> bool:
    """Whether to torch.compile. auto: always on CUDA; on CPU only for budgets long enough to
    repay a cold compile (about 45 s for a small GPT on 2 cores, for a 15-35% faster step)."""
    if mode == "off":
        return False
    reason = can_compile()
    if reason:
        if mode == "on":
            print(f"warning: not compiling: {reason}", file=sys.stderr)
        return False
    if mode == "on" or device.type == "cuda":
        return True
    return device.type == "cpu" and budget_s is not None and budget_s >= CPU_COMPILE_MIN_BUDGET_S


CPU_COMPILE_MIN_BUDGET_S = 600.0


@dataclass
class Runtime:
    device: torch.device
    precision: str
    compiled: bool

    def autocast(self):
        return autocast(self.device, self.precision)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without making the host wait for the GPU's queue: a copy from pageable memory
    would first wait for the stream, so batches for CUDA go through page-locked memory."""
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
