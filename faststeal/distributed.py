"""Scale-out on torch.distributed (launched by torchrun; Gloo on CPU, NCCL on GPU).

Two kinds of parallelism, both over the standard process group (no home-made pool):

* **grid cells** — the cells of a comparison (method × seed × member count) are dealt round-robin
  to ranks; every rank writes its finished cells into the shared SQLite store of the run folder
  (one transaction per cell), and rank 0 rebuilds the report at the end;
* **member sharding** — a Deep Ensemble's S members are split into contiguous shards, one per
  rank; each rank trains only its members (same member seeds as in one process, so the same
  members), and the member predictions are all-gathered for the across-member statistics.

The oracle is queried once, by rank 0, and its answers broadcast: the budget is counted once.

Failure: a rank that raises leaves without waiting for the others (``shutdown(ctx,
failed=True)`` skips the final barrier, which the other ranks, blocked in some other collective,
would never join). Its exit closes its Gloo/NCCL connections, so the other ranks' pending
collective fails at once, and torchrun stops the remaining workers: the whole job ends within
seconds with the failing rank's message (``faststeal: error (rank R of W): ...``).

Launch: ``faststeal run --nproc 4 ...`` (re-executes itself under ``torch.distributed.run``) or
``torchrun --nproc-per-node 4 -m faststeal run ...``. Several nodes: ``torchrun --nnodes 2
--nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m faststeal run --out
/shared/run ...`` on every node (the run folder must be on a shared filesystem with working
POSIX locks for SQLite, e.g. NFSv4 or Lustre; see README "Scale-out"). Under SLURM: ``srun --nodes 2 --ntasks-per-node 1 torchrun --nnodes 2
--nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $(scontrol show hostnames
$SLURM_NODELIST | head -n1):29500 -m faststeal run ...``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "cpu") -> Context:
    """Join the process group torchrun describes in the environment; single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Context(dist.get_rank(), dist.get_world_size())


def shutdown(ctx: Context, failed: bool = False) -> None:
    """Leave the process group: after a final barrier when this rank finished its work, at once
    when it ``failed`` (the other ranks may be inside a collective this rank never joins)."""
    if ctx.enabled and dist.is_initialized():
        if failed:
            return  # exiting closes the connections; the others' collectives then fail
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        dist.barrier()


def broadcast_tensor(ctx: Context, t: Optional[torch.Tensor], src: int = 0) -> torch.Tensor:
    """Rank ``src``'s tensor on every rank (shape/dtype sent first, so others pass None)."""
    if not ctx.enabled:
        assert t is not None
        return t
    meta: list[Any] = [None]
    if ctx.rank == src:
        meta = [(tuple(t.shape), t.dtype, t.device.type)]
    dist.broadcast_object_list(meta, src=src)
    shape, dtype, _ = meta[0]
    dev = _comm_device()
    buf = t.to(dev).contiguous() if ctx.rank == src else torch.empty(shape, dtype=dtype, device=dev)
    dist.broadcast(buf, src=src)
    return buf


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def my_cells(ctx: Context, cells: Sequence) -> list:
    """Round-robin share of the grid for this rank."""
    return [c for i, c in enumerate(cells) if i % ctx.world_size == ctx.rank]


def can_shard(ctx: Context, members: int) -> bool:
    """Whether ``members`` can be split over the ranks (at least one member per rank)."""
    return members >= ctx.world_size


def member_shard(ctx: Context, members: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous block of ``members`` (sizes differ by at most 1).

    Needs ``members >= world_size`` (every rank trains at least one member); a smaller ensemble
    is trained whole by one rank (:func:`can_shard`)."""
    if not can_shard(ctx, members):
        raise ValueError(f"cannot split {members} member(s) over {ctx.world_size} ranks: every "
                         "rank needs at least one member; train this ensemble on one rank")
    base, extra = divmod(members, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return start, start + base + (1 if ctx.rank < extra else 0)


def all_gather_members(ctx: Context, local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (S_r, B, C) member predictions along the member axis, in rank order."""
    if not ctx.enabled:
        return local
    sizes: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(sizes, int(local.shape[0]))
    dev = _comm_device()
    loc = local.to(dev).contiguous()
    bufs = [torch.empty((s, *loc.shape[1:]), dtype=loc.dtype, device=dev) for s in sizes]
    # all_gather needs equal shapes: pad to the largest shard
    mx = max(sizes)
    pad = torch.zeros((mx, *loc.shape[1:]), dtype=loc.dtype, device=dev)
    pad[:loc.shape[0]] = loc
    gathered = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(gathered, pad)
    for b, g, s in zip(bufs, gathered, sizes):
        b.copy_(g[:s])
    return torch.cat(bufs).to(local.device)


def relaunch_with_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """``faststeal run --nproc N ...`` → ``python -m torch.distributed.run --nproc-per-node N -m
    faststeal run ...`` (standalone rendezvous on this machine)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "faststeal", *argv]
    return subprocess.call(cmd)
