"""Multi-process data parallel on torch.distributed (launched by `torchrun` or `accelerate launch`).

The contract (see README "Scaling up"):
  - every rank reads the same prompt stream and rolls out its own contiguous share of each global
    batch, so a group never spans ranks and rewards / group advantages stay rank-local;
  - the policy is wrapped in DistributedDataParallel: gradients are all-reduced (averaged) in
    backward, and the loss is scaled so that the average equals the gradient of the global loss
    with a *global* normaliser (token count or sequence count summed over ranks);
  - scalar metrics are reduced across ranks; only rank 0 logs, evaluates and checkpoints.

Without the launcher's environment (RANK / WORLD_SIZE unset) everything here is the identity and
`SINGLE` is used, so a one-process run never touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

# metrics that add up over ranks (counts); every other metric is averaged
SUM_METRICS = (
    "sampling/samples",
    "sampling/tokens",
    "sampling/groups_kept",
    "sampling/groups_dropped",
    "sampling/extra_samples",
    "rollout/num_sequences",
    "reward/errors",
)
# metrics that take the largest value over ranks
MAX_METRICS = ("rollout/response_length_max", "perf/rollout_s", "perf/logprob_s", "perf/update_s")


class DistributedError(RuntimeError):
    """The distributed environment is inconsistent with the run's settings."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; rank 0 of 1 means no torch.distributed at all."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's contiguous share of a global list whose length the world size divides."""
        if len(items) % self.world_size:
            raise DistributedError(f"{len(items)} items do not split over {self.world_size} ranks")
        n = len(items) // self.world_size
        return items[self.rank * n : (self.rank + 1) * n]

    def all_reduce(self, value: float, op: str = "sum") -> float:
        """A Python number reduced over ranks: op in {"sum", "max", "min"}."""
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        ops = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}
        tdist.all_reduce(t, op=ops[op])
        return t.item()

    def any(self, flag: bool) -> bool:
        """True on every rank when the flag is true on some rank."""
        return bool(self.all_reduce(float(flag), "max"))

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def device(self) -> torch.device:
        """The device collectives run on: this rank's GPU under NCCL, else the CPU."""
        if self.enabled and tdist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


SINGLE = DistContext()


def _slurm_tasks() -> int:
    """Tasks of an `srun` step (e.g. Hydra's submitit launcher with tasks_per_node > 1); 1 outside one."""
    return int(os.environ.get("SLURM_NTASKS", "1")) if "SLURM_PROCID" in os.environ else 1


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun / accelerate launch, else the SLURM step's task count, else 1."""
    return int(os.environ.get("WORLD_SIZE", _slurm_tasks()))


def _export_slurm_env() -> None:
    """SLURM tasks without a launcher's variables: derive RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
    and MASTER_PORT from SLURM's (submitit's TorchDistributedEnvironment)."""
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError as err:
        raise DistributedError(
            "several SLURM tasks but no RANK / WORLD_SIZE: pip install submitit, or start them with torchrun"
        ) from err
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # LOCAL_RANK picks the GPU


def init_distributed(backend: str = "auto", timeout_minutes: float = 30.0) -> DistContext:
    """Join the process group described by the launcher's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); `backend` auto = nccl when CUDA is available, else gloo.
    Returns SINGLE when the process was not started by a launcher with more than one process."""
    world = launched_world_size()
    if world <= 1:
        return SINGLE
    if "RANK" not in os.environ:
        _export_slurm_env()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not tdist.is_initialized():
        tdist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (a no-op without one)."""
    if ctx.enabled and tdist.is_initialized():
        tdist.destroy_process_group()


def wrap_ddp(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DistributedDataParallel around `module` (which must already sit on its device); the module
    itself when not distributed. Rank 0's weights are broadcast to all ranks here."""
    if not ctx.enabled:
        return module
    device_ids = [ctx.local_rank] if next(module.parameters()).is_cuda else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (generation, evaluation and saving use it)."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


@contextlib.contextmanager
def no_sync(modules: list[torch.nn.Module | None], skip: bool) -> Iterator[None]:
    """Hold back DDP's gradient all-reduce for the modules (gradient accumulation) when `skip`."""
    with contextlib.ExitStack() as stack:
        for m in modules:
            if skip and isinstance(m, torch.nn.parallel.DistributedDataParallel):
                stack.enter_context(m.no_sync())
        yield


def reduce_metrics(metrics: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Metrics of every rank reduced to one dict: counts (SUM_METRICS) add up, MAX_METRICS take the
    maximum, everything else is the mean over the ranks that report a finite value."""
    if not ctx.enabled:
        return metrics
    per_rank = ctx.gather_objects(metrics)
    keys = sorted({k for m in per_rank for k in m})
    out = {}
    for key in keys:
        values = [m[key] for m in per_rank if key in m and math.isfinite(m[key])]
        if not values:
            out[key] = float("nan")
        elif key in SUM_METRICS:
            out[key] = float(sum(values))
        elif key in MAX_METRICS:
            out[key] = float(max(values))
        else:
            out[key] = float(sum(values) / len(values))
    return out
