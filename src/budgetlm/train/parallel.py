"""Several processes on torch.distributed, launched by torchrun: the process group, the model's wrapping
(DDP, or FSDP2's fully_shard on each block then the root) and the collectives the loop needs.

Outside torchrun (no WORLD_SIZE in the environment) nothing here runs and training is one process,
as before. Like torchtitan's `parallelize`, the wrapping is applied from outside: the model code
does not know it is sharded."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from budgetlm.errors import UserError
from budgetlm.report import say
from budgetlm.train.runtime import pick_device, precision_dtype

SLOW_RANK_ENV = "BUDGETLM_TEST_SLOW_RANK"
# bytes per parameter of training state on one device under DDP: weights, gradients, two Adam moments (fp32)
TRAINING_BYTES_PER_PARAM = 16
# share of a device's memory the training state may take for DDP to be picked (the rest: activations)
DDP_MEMORY_SHARE = 0.5


def launched() -> bool:
    """Whether torchrun started this process (it sets WORLD_SIZE, RANK and LOCAL_RANK)."""
    return "WORLD_SIZE" in os.environ


def join(strategy: str, device: str) -> "Parallel | None":
    """This process's place among several under torchrun, None outside it (where a --strategy other than auto
    is only warned about)."""
    if not launched():
        if strategy != "auto":
            say(f"warning: --strategy {strategy} applies under torchrun only (docs/distributed.md); training in one "
                "process")
        return None
    return Parallel.start(pick_device(device))


def main_first(parallel: "Parallel | None"):
    """A block the first process runs before the others (outside torchrun: just the block)."""
    return parallel.main_first() if parallel is not None else contextlib.nullcontext()


@dataclass
class Parallel:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    strategy: str = "ddp"          # the one in use: ddp or fsdp (auto is resolved by `wrap`)
    _control: dist.ProcessGroup | None = None  # gloo: decisions travel on the host, without waiting for a GPU

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: torch.device) -> "Parallel":
        """Join the process group torchrun set up: NCCL on CUDA (this process on GPU LOCAL_RANK), gloo on CPU."""
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
            control = dist.new_group(backend="gloo")
        elif device.type == "cpu":
            dist.init_process_group("gloo")
            control = None
        else:
            raise UserError(f"torchrun: training on {device.type} across processes is not supported; use --device "
                            "cpu or cuda")
        return cls(rank, world, local_rank, device, _control=control)

    def lag(self) -> None:
        """For tests only: BUDGETLM_TEST_SLOW_RANK="rank:seconds" makes that rank sleep each step."""
        rank, _, seconds = os.environ.get(SLOW_RANK_ENV, "").partition(":")
        if rank and int(rank) == self.rank:
            time.sleep(float(seconds))

    def close(self) -> None:
        """Leave the process group once every rank is done with it: a rank that tore its connections down while
        another still had collectives in flight could abort the job at its very end."""
        if dist.is_initialized():
            dist.barrier(group=self._control)
            dist.destroy_process_group()

    def barrier(self) -> None:
        dist.barrier(group=self._control)

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (tokenizing into the cache, say), the others after it, from its results."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def share(self, obj):
        """Rank 0's `obj` on every rank (a plan, say): a decision some ranks could otherwise make differently."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def agree(self, values: list[float]) -> list[float]:
        """Rank 0's numbers on every rank: one small broadcast on the host."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.broadcast(t, src=0, group=self._control)
        return t.tolist()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    def peak_memory_mb(self) -> list[float]:
        """Each rank's peak memory in MiB: allocated on its GPU, else its resident set (RSS, libraries included)."""
        if self.device.type == "cuda":
            mine = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            import resource  # not on Windows, where torchrun is not used for CPU training
            mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        every = [None] * self.world
        dist.all_gather_object(every, round(mine, 1), group=self._control)
        return every

    def split_batch(self, micro_batch: int, micro_steps: int) -> tuple[int, int]:
        """(micro-batch, micro-steps) of one rank, so that the ranks together read each step's sequences once."""
        return split_batch(micro_batch, micro_steps, self.world, "sequences",
                           f"give --batch-tokens a multiple of {self.world} × --context")

    def refuse_unsupported(self, *, ema: float = 0.0, l1: float = 0.0) -> None:
        """Under FSDP the moving average (a copy of sharded weights) and the L1 penalty (a sum over shards
        outside the model's forward) are not supported; under DDP both are the same on every rank."""
        if self.strategy != "fsdp":
            return
        for flag, value in (("--ema", ema), ("--l1", l1)):
            if value:
                self.close()
                raise UserError(f"{flag} is not supported under --strategy fsdp; use --strategy ddp or train "
                                "without it")

    def pick_strategy(self, asked: str, model: nn.Module) -> str:
        """auto: DDP when the model and its optimizer state fit one device with room for activations, else FSDP."""
        if asked != "auto":
            return asked
        need = TRAINING_BYTES_PER_PARAM * sum(p.numel() for p in model.parameters())
        if self.device.type == "cuda":
            have = torch.cuda.get_device_properties(self.device).total_memory
        else:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
            have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // local_world
        return "ddp" if need <= DDP_MEMORY_SHARE * have else "fsdp"

    def wrap(self, model: nn.Module, strategy: str, precision: str, *, unused_parameters: bool = False) -> nn.Module:
        """The module to call for training: DDP around `model`, or `model` itself sharded in place by
        fully_shard (each block, then the root; parameters in bf16 with fp32 gradient reduction under bf16).
        `unused_parameters`: some parameters may get no gradient in a step (a body frozen for its first
        steps, a language-model head a classifier does not call), which DDP must then look for."""
        self.strategy = self.pick_strategy(strategy, model)
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False,
                                           find_unused_parameters=unused_parameters)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = (MixedPrecisionPolicy(param_dtype=precision_dtype(precision), reduce_dtype=torch.float32)
              if precision in ("bf16", "fp16") else MixedPrecisionPolicy())
        # rank 0's initial weights everywhere (DDP does the same), however the ranks' random generators went
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
        for block in blocks_of(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model

    def accumulating(self, forward: nn.Module, last: bool):
        """A micro-step's context: under DDP the gradient all-reduce runs on the last micro-step only."""
        if self.strategy == "ddp" and not last:
            return forward.no_sync()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def whole(self, model: nn.Module):
        """The model's full parameters for calls that bypass its forward (calibration calls `hidden`, `logits`)."""
        if self.strategy != "fsdp":
            yield
            return
        model.unshard()
        try:
            yield
        finally:
            model.reshard()

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's whole weights on rank 0 (on the CPU), for the model.safetensors one process would write."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def split_batch(micro_batch: int, micro_steps: int, world: int, unit: str, fix: str) -> tuple[int, int]:
    """(micro-batch, micro-steps) of one of `world` ranks that together read a step's micro_batch × micro_steps
    `unit` (sequences, examples) once: the largest micro-batch up to the asked one that divides this rank's
    share. `fix`: what to give instead when the step does not split evenly."""
    total = micro_batch * micro_steps
    if total % world:
        raise UserError(f"a step's {total} {unit} do not split evenly over {world} processes; {fix}")
    share = total // world
    local = max(d for d in range(1, min(micro_batch, share) + 1) if share % d == 0)
    return local, share // local


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated layers FSDP shards one by one: the members of the model's ModuleLists."""
    found = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    if not found:
        raise UserError("--strategy fsdp: the model has no list of blocks to shard; use --strategy ddp")
    return found


def clip_gradients(parameters, max_norm: float, parallel: Parallel | None) -> torch.Tensor:
    """clip_grad_norm_, and under FSDP the same norm one process would compute: each gradient's norm taken
    over the whole gradient, gathered one at a time. (clip_grad_norm_ on the shards adds fp32 sums of
    squares in another order: off by about 2e-5 of the norm at 0.5M elements, enough for runs to drift apart.)"""
    if parallel is None or parallel.strategy != "fsdp":
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    from torch.utils._foreach_utils import _has_foreach_support
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = []
    for g in grads:
        whole = whole_matrix(g)
        norms.append(torch._foreach_norm([whole], 2.0)[0] if _has_foreach_support([whole], whole.device)
                     else torch.linalg.vector_norm(whole, 2.0))
        del whole
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(float(coef))
    return total


def whole_matrix(t: torch.Tensor) -> torch.Tensor:
    """A sharded matrix gathered whole on every rank (Muon's Newton–Schulz needs whole matrices)."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`full`, the same on every rank, sharded as `reference` is, without communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(reference, DTensor):
        return full
    return distribute_tensor(full, reference.device_mesh, reference.placements, src_data_rank=None)
