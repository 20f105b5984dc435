"""Training-state checkpoints for exact resume: written atomically, verified by checksums.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding the model weights and the best weights
so far (safetensors), the optimizer state (torch.save of tensors only, read back with
weights_only=True), and everything else as JSON: loop state, schedule state, RNG states and the
budget time spent. `manifest.json` lists every file's SHA-256 and is written last; the folder is
assembled under a temporary name and renamed, so a kill at any moment leaves either the whole
checkpoint or none of it. A checkpoint that fails its checksums is skipped for the previous one.

Under torchrun the weights, best weights and optimizer state go through torch.distributed.checkpoint
instead (a `.metadata` file and one shard file per rank, each rank writing its own part, readable by
any number of processes, one included); the JSON, RNG and manifest files are the same."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from budgetlm.errors import UserError
from budgetlm.train.checkpoint import atomic_write_bytes, save_weights

PREFIX = "step-"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able states, tensor states) of the python, numpy and torch generators."""
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


@dataclasses.dataclass
class Snapshot:
    """What a checkpoint restores."""
    path: Path
    model: dict[str, torch.Tensor] | None   # None, with best and optimizer, where `sharded`
    best: dict[str, torch.Tensor] | None
    optimizer: dict | None
    meta: dict  # loop state, schedule state, scaler state, spent time, run identity
    rng: tuple[dict, dict[str, torch.Tensor]]
    averaged: dict[str, torch.Tensor] | None = None  # the moving average of the weights (--ema)
    sharded: bool = False  # written by several processes: `load_sharded` restores it into the model

    def restore_rng(self) -> None:
        set_rng_state(*self.rng)


class Checkpoints:
    """The checkpoint folders of one run: save, keep the last `keep`, find the newest valid one."""

    def __init__(self, folder: Path, keep: int = 2):
        self.folder = folder
        self.keep = max(1, keep)

    def all(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))

    def save(self, step: int, *, model: dict, best: dict | None, optimizer: dict, meta: dict,
             averaged: dict | None = None) -> Path:
        tmp = self.folder / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            save_weights(model, tmp / "model.safetensors")
            if best is not None:
                save_weights(best, tmp / "best.safetensors")
            if averaged is not None:
                save_weights(averaged, tmp / "averaged.safetensors")
            with (tmp / "optimizer.pt").open("wb") as f:
                torch.save(optimizer, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            self._failed(tmp, e)
        return self.seal(tmp, step, meta)

    def seal(self, tmp: Path, step: int, meta: dict) -> Path:
        """Add the RNG and JSON state and the manifest to the folder `tmp`, rename it into place and
        drop checkpoints beyond `keep`."""
        final = self.folder / f"{PREFIX}{step:08d}"
        try:
            rng_meta, rng_tensors = rng_state()
            save_weights(rng_tensors, tmp / "rng.safetensors")
            atomic_write_bytes(tmp / "state.json", json.dumps({**meta, "rng": rng_meta}).encode())
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
            atomic_write_bytes(tmp / "manifest.json", json.dumps({"step": step, "files": files}).encode())
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.folder)
        except OSError as e:
            self._failed(tmp, e)
        for old in self.all()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _failed(self, tmp: Path, e: OSError):
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not save a checkpoint in {self.folder} ({e.strerror or e}); free space or "
                        "choose another --out; earlier checkpoints are intact") from None

    @staticmethod
    def verify(path: Path) -> str | None:
        """None when every file matches its checksum, else what is wrong."""
        manifest = path / "manifest.json"
        if not manifest.is_file():
            return "no manifest (an interrupted save)"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (json.JSONDecodeError, KeyError):
            return "unreadable manifest"
        for name, digest in files.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if _sha256(f) != digest:
                return f"{name} fails its checksum (truncated or corrupted)"
        return None

    def latest_valid(self, warn=lambda m: print(m, file=sys.stderr)) -> Path | None:
        for path in reversed(self.all()):
            problem = self.verify(path)
            if problem is None:
                return path
            warn(f"warning: skipping checkpoint {path}: {problem}; trying the previous one")
        return None


def load_snapshot(path: Path) -> Snapshot:
    problem = Checkpoints.verify(path)
    if problem:
        raise UserError(f"checkpoint {path} is not usable: {problem}")
    meta = json.loads((path / "state.json").read_text())
    if is_sharded(path):
        rng = (meta.pop("rng"), load_file(str(path / "rng.safetensors")))
        return Snapshot(path=path, model=None, best=None, optimizer=None, meta=meta, rng=rng, sharded=True)
    best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").is_file() else None
    averaged = load_file(str(path / "averaged.safetensors")) if (path / "averaged.safetensors").is_file() else None
    with (path / "optimizer.pt").open("rb") as f:
        optimizer = torch.load(f, weights_only=True, map_location="cpu")
    rng = (meta.pop("rng"), load_file(str(path / "rng.safetensors")))
    return Snapshot(path=path, model=load_file(str(path / "model.safetensors")), best=best,
                    optimizer=optimizer, meta=meta, rng=rng, averaged=averaged)


def find_resume(resume: str | None, out: Path, *, needs: tuple[str, ...] = ("tokenizer.json",),
                warn=lambda m: print(m, file=sys.stderr)) -> Snapshot | None:
    """The snapshot `--resume` asks for: "auto" takes the newest valid checkpoint in `out` (None when
    there is none: a fresh start); a path takes that checkpoint folder or a run folder's newest."""
    if not resume:
        return None
    if resume == "auto":
        path = Checkpoints(out / "checkpoints").latest_valid(warn=warn)
        if path is None:
            return None
    else:
        path = Path(resume)
        if (path / "checkpoints").is_dir():
            path = Checkpoints(path / "checkpoints").latest_valid(warn=warn)
            if path is None:
                raise UserError(f"{resume}: no valid checkpoint to resume from")
        elif not path.is_dir():
            raise UserError(f"--resume {resume}: no such checkpoint folder; use --resume auto or a checkpoint path")
    for name in needs:
        if not (out / name).is_file():
            raise UserError(f"cannot resume into {out}: its {name} is missing; resume with the run's own --out")
    return load_snapshot(path)


def is_sharded(path: Path) -> bool:
    """Whether torch.distributed.checkpoint wrote the checkpoint's tensors (several processes did)."""
    return (path / ".metadata").is_file()


def save_sharded(checkpoints: Checkpoints, parallel, step: int, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, best: dict | None, meta: dict,
                 averaged: torch.nn.Module | None = None) -> Path:
    """A checkpoint written by every rank together: each its part of the weights and optimizer state
    (torch.distributed.checkpoint), then rank 0 the rest and the rename, after a barrier. `averaged`: the
    moving average of the weights (under DDP, the same on every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = checkpoints.folder / f".tmp-{PREFIX}{step:08d}-shared"
    if parallel.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if best is not None:
        state["best"] = best
    if averaged is not None:
        state["averaged"] = averaged.state_dict()
    try:
        dcp.save(state, checkpoint_id=tmp)
    except OSError as e:
        checkpoints._failed(tmp, e)
    parallel.barrier()
    final = checkpoints.folder / f"{PREFIX}{step:08d}"
    if parallel.main:
        checkpoints.seal(tmp, step, {**meta, "has_best": best is not None, "has_averaged": averaged is not None,
                                     "world_size": parallel.world})
    parallel.barrier()
    return final


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 has_best: bool, averaged: torch.nn.Module | None = None) -> dict | None:
    """Restore a checkpoint of `save_sharded` into `model`, `optimizer` (and `averaged`, the moving average,
    where given), however many processes wrote it and however many read it (one without a process group
    included); returns the best weights."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if has_best:
        state["best"] = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    if averaged is not None:
        state["averaged"] = averaged.state_dict()  # read in place
    alone = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    with warnings.catch_warnings():  # read by one process without a process group: what was meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=alone)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return state.get("best")
