"""Multi-process data parallel on torch.distributed (launched by `torchrun` or `accelerate launch`).

The contract (see docs/scaling.md):
  - every rank reads the same prompt stream and rolls out its own contiguous share of each global
    batch, so a group never spans ranks and rewards / group advantages stay rank-local;
  - the policy is wrapped in DistributedDataParallel (trainer.zero_stage 0-1) or sharded with FSDP2
    (`fully_shard`, zero_stage 2-3): gradients are averaged over ranks in backward, and the loss is
    scaled so that the average equals the gradient of the global loss with a *global* normaliser
    (token count or sequence count summed over ranks);
  - scalar metrics are reduced across ranks; evaluation is split over them; only rank 0 logs and
    checkpoints.

Sharded parameters (zero_stage 2-3, the ZeRO stages of Rajbhandari et al. 2020, arXiv:1910.02054,
as FSDP's SHARD_GRAD_OP / FULL_SHARD): each rank holds 1/W of every weight, gradient and AdamW
moment. A forward then all-gathers weights, a collective that every rank must call equally often.
The update pass keeps that lockstep (every rank runs the same number of micro-batches), but
generation, the no-grad log-prob passes and evaluation run different numbers of forwards
per rank; they run inside `gathered(...)`, which all-gathers the whole model once (all ranks) so
that the forwards inside need no collective, and shards it again after.

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
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer

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
MAX_METRICS = (
    "rollout/response_length_max",
    "perf/rollout_s",
    "perf/logprob_s",
    "perf/update_s",
    "perf/train_state_mb",
    "perf/peak_rss_mb",
)


class DistributedError(RuntimeError):
    """The distributed environment is inconsistent with the run's settings."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; rank 0 of 1 means no torch.distributed at all."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    zero_stage: int = 0  # trainer.zero_stage: 0 DDP, 1 + sharded AdamW state, 2-3 FSDP (see module doc)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def shards_params(self) -> bool:
        """Whether weights are sharded over the ranks (FSDP, zero_stage 2-3)."""
        return self.enabled and self.zero_stage >= 2

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

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over ranks (a new tensor on the tensor's device); itself in one process."""
        if not self.enabled:
            return tensor
        out = tensor.detach().to(self.device, copy=True)
        tdist.all_reduce(out)
        return out.to(tensor.device)

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


def init_distributed(
    backend: str = "auto", zero_stage: int = 0, timeout_minutes: float = 30.0
) -> DistContext:
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
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, zero_stage=zero_stage)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (a no-op without one)."""
    if ctx.enabled and tdist.is_initialized():
        tdist.destroy_process_group()


def wrap_model(module: torch.nn.Module, ctx: DistContext, bf16: bool = False) -> torch.nn.Module:
    """The trainable `module` (already on its device) for data parallel: DistributedDataParallel for
    zero_stage 0-1 (rank 0's weights are broadcast here), sharded in place by `shard_model` for 2-3;
    the module itself in one process."""
    if not ctx.enabled:
        return module
    if ctx.shards_params:
        return shard_model(module, ctx, bf16)
    device_ids = [ctx.local_rank] if next(module.parameters()).is_cuda else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def _block_classes(module: torch.nn.Module) -> set[str]:
    """Names of the transformer block classes (Hugging Face's `_no_split_modules`, e.g.
    LlamaDecoderLayer) of every pretrained model inside `module`."""
    return {name for m in module.modules() for name in (getattr(m, "_no_split_modules", None) or ())}


def shard_model(module: torch.nn.Module, ctx: DistContext, bf16: bool = False) -> torch.nn.Module:
    """Shard `module`'s weights over the ranks with FSDP2 (`fully_shard`): one unit per transformer
    block plus the root (embeddings, final norm, head). zero_stage 3 frees a block's gathered
    weights after its forward and gathers them again in backward (FULL_SHARD); zero_stage 2 keeps
    them from forward to backward (SHARD_GRAD_OP). Gradients are reduce-scattered (averaged) and the
    optimizer, built on the sharded parameters afterwards, keeps 1/W of the AdamW state.
    `bf16`: weights are gathered and run in bfloat16, gradients reduced in float32 (FSDP's
    MixedPrecisionPolicy); the sharded master weights stay in their own dtype. Returns `module`
    (FSDP2 shards in place)."""
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": ctx.zero_stage == 3}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = _block_classes(module)
    for m in list(module.modules()):
        if type(m).__name__ in blocks:
            fully_shard(m, **kwargs)
    fully_shard(module, **kwargs)
    return module


@contextlib.contextmanager
def gathered(modules: list[torch.nn.Module | None], ctx: DistContext) -> Iterator[None]:
    """Inside the block the FSDP-sharded `modules` hold their whole weights, so forwards run without
    collectives and ranks may run different numbers of them (generation, no-grad passes,
    evaluation, weight syncs). Every rank must enter it (the gather is a collective); it is the identity
    for unsharded modules. On exit the weights are sharded again, as set by ctx.zero_stage (FSDP2
    keeps each root's weights after forward, as it does itself)."""
    roots = [m for m in modules if isinstance(m, FSDPModule)]
    units = [(root, m) for root in roots for m in root.modules() if isinstance(m, FSDPModule)]
    for _, unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for root, unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(ctx.zero_stage == 3 and unit is not root, recurse=False)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
_FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def model_state_dict(module: torch.nn.Module, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """The whole state dict of `module` (DDP unwrapped) on rank 0, None on other ranks. A collective
    when the module is FSDP-sharded: every rank must call it."""
    if isinstance(module, FSDPModule):
        state = get_model_state_dict(module, options=_FULL)  # gathered to rank 0's CPU memory
        # a tied weight (SmolLM2's lm_head = embed_tokens) comes back as two copies: keep the first
        first: dict[int, str] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            if first.setdefault(id(p), name) != name:
                state.pop(name, None)
    else:
        state = unwrap(module).state_dict()
    return state if ctx.is_main else None


def load_model_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict (as `model_state_dict` wrote it) into `module`, sharded or not;
    a collective for an FSDP module (rank 0's copy is the one broadcast)."""
    if isinstance(module, FSDPModule):
        set_model_state_dict(module, state, options=_FROM_RANK0)
    else:
        unwrap(module).load_state_dict(state)


def optimizer_state_dict(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext
) -> dict[str, Any] | None:
    """The optimizer's whole state on rank 0 (None elsewhere); a collective when it is sharded.
    ZeRO-1 consolidates its shards; under FSDP the state is keyed by parameter name, otherwise by
    parameter index, as torch's `Optimizer.state_dict` does."""
    if isinstance(module, FSDPModule):
        state = get_optimizer_state_dict(module, optimizer, options=_FULL)
        return state if ctx.is_main else None
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)  # its state_dict is then valid on rank 0 only
    return optimizer.state_dict() if ctx.is_main else None


def keyed_by_name(optimizer_state: dict[str, Any]) -> bool:
    """Whether an optimizer state dict is keyed by parameter name (FSDP) rather than by index."""
    return any(isinstance(k, str) for k in optimizer_state.get("state", {})) or any(
        isinstance(p, str) for group in optimizer_state.get("param_groups", []) for p in group["params"]
    )


def load_optimizer_state_dict(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """The inverse of `optimizer_state_dict`; raises DistributedError for a state written under the
    other layout (FSDP vs not), which the parameters cannot be matched to."""
    sharded = isinstance(module, FSDPModule)
    if keyed_by_name(state) != sharded:
        raise DistributedError(
            "the optimizer state was written with trainer.zero_stage "
            f"{'2-3 (FSDP)' if not sharded else '0-1'} and cannot be loaded with "
            f"{'2-3 (FSDP)' if sharded else '0-1'}: resume with the run's zero_stage"
        )
    if sharded:
        set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=_FROM_RANK0)
    else:
        optimizer.load_state_dict(state)


def local_bytes(tensor: torch.Tensor | None) -> int:
    """Bytes of `tensor` held by this rank: its local shard for an FSDP DTensor."""
    if tensor is None:
        return 0
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def train_state_bytes(
    modules: list[torch.nn.Module | None], optimizers: list[torch.optim.Optimizer | None]
) -> int:
    """Bytes this rank holds for the weights and gradients of `modules` and the state (AdamW
    moments) of `optimizers`: what zero_stage 1-3 shard (activations and caches not included)."""
    params = {id(p): p for m in modules if m is not None for p in m.parameters()}.values()
    total = sum(local_bytes(p) + local_bytes(p.grad) for p in params)
    for optimizer in optimizers:
        if optimizer is None:
            continue
        local = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer: this rank's shard
        total += sum(
            local_bytes(v) for state in local.state.values() for v in state.values() if torch.is_tensor(v)
        )
    return total


def scalar(value: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (e.g. clip_grad_norm_'s total norm of sharded gradients) as a plain tensor."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (generation, evaluation and saving use it); an FSDP module
    is its own (sharded in place)."""
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
