"""Pruning across processes with torch.distributed (launched by torchrun; NCCL on GPUs, gloo on CPUs).

Data-parallel calibration: each rank runs its shard of the calibration samples, and the layer
statistics are summed across ranks (token counts included), so every rank holds the Hessian a
single process would. Layer-parallel solving: the linears of a decoder layer are dealt out by
cost, each rank solves its share and broadcasts the pruned weights.
"""
from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from thanos.errors import ThanosExportError
from thanos.hessian import HessianAccumulator

log = logging.getLogger(__name__)


class DistributedError(ThanosExportError, RuntimeError):
    """A rank died or the rendezvous failed; finished layers are kept, so a rerun resumes."""


class Parallel:
    """This process's place in the group. A group of one behaves exactly like a single process."""

    def __init__(self):
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, samples: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the calibration samples (n, seqlen)."""
        return torch.tensor_split(samples, self.world)[self.rank]

    def shard_indices(self, count: int) -> list[int]:
        """Global indices of the samples `shard` gives this rank, out of `count`."""
        return torch.tensor_split(torch.arange(count), self.world)[self.rank].tolist()

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """Sum (or, with op="max", take the largest of) `tensor` over ranks, in place (a no-op in a group of one)."""
        if self.active:
            self._call(dist.all_reduce, tensor, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)

    def reduce_stats_(self, acc: HessianAccumulator) -> None:
        """Sum the fp64 statistics and token counts over ranks: every rank reads the single process's Hessian."""
        if not self.active:
            return
        tokens = torch.tensor([float(acc.tokens)], device=acc.sum.device, dtype=torch.float64)
        self._call(dist.all_reduce, acc.sum)
        self._call(dist.all_reduce, tokens)
        acc.tokens = int(tokens.item())

    def owners(self, costs: dict[str, float]) -> dict[str, int]:
        return deal_by_cost(costs, self.world)

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        if self.active:
            self._call(dist.broadcast, tensor, src)

    def broadcast_object(self, value, src: int = 0):
        if not self.active:
            return value
        box = [value]
        self._call(dist.broadcast_object_list, box, src)
        return box[0]

    def run_on_main(self, fn):
        """Run `fn` on rank 0 and hand every rank its result, or its exception to raise."""
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except Exception as exc:  # every rank must hear about it, or the others wait forever
                outcome = ("error", exc)
        kind, value = self.broadcast_object(outcome)
        if kind == "error":
            raise value
        return value

    def barrier(self) -> None:
        if self.active:
            self._call(dist.barrier)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as exc:
            if not _lost_peer(exc):
                raise  # a CUDA out-of-memory or a bug keeps its own message and traceback
            raise DistributedError(
                f"rank {self.rank}: a collective failed ({exc}). A rank died or lost its connection; the finished "
                "layers are saved, so rerunning the same command resumes") from exc


def _lost_peer(exc: RuntimeError) -> bool:
    """Whether a collective failed because a rank or its connection went away (gloo and NCCL say so in words)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(word in text for word in ("connection", "closed", "peer", "timed out", "timeout", "gloo", "nccl",
                                         "broken pipe", "socket"))


def deal_by_cost(costs: dict[str, float], ranks: int) -> dict[str, int]:
    """Deal the linears out by cost, largest first, each to the least loaded rank."""
    load = [0.0] * ranks
    owner = {}
    for name, cost in sorted(costs.items(), key=lambda kv: -kv[1]):
        rank = min(range(ranks), key=lambda r: load[r])
        owner[name] = rank
        load[rank] += cost
    return owner


def init_from_env(timeout_s: float = 3600) -> torch.device:
    """Join the torchrun group; returns this rank's device (cuda:LOCAL_RANK, or cpu with gloo).

    The timeout is long because the other ranks wait while rank 0 alone evaluates perplexity; a
    rank that dies is still noticed at once on gloo (its sockets close).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise DistributedError("--distributed needs torchrun: `torchrun --nproc-per-node N -m cli prune --distributed "
                               "<prune options>`, which sets RANK, WORLD_SIZE and MASTER_ADDR")
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if dist.is_initialized():  # joined already by a caller (prune-and-build claims its folder first)
        return device
    if cuda:
        torch.cuda.set_device(local_rank)
    _import_group_defaults()
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:
        raise DistributedError(f"the rendezvous failed ({exc}); check MASTER_ADDR/MASTER_PORT and that every "
                               "rank was launched") from exc
    return device


def _import_group_defaults() -> None:
    """Import torch.distributed.nn before the group exists, never after.

    Its functions take `group=group.WORLD` as a default argument, evaluated at import: imported
    after init_process_group (transformers' from_pretrained does so), they hold the group for the
    life of the process, destroy_process_group cannot free it, and gloo's worker threads are torn
    down during interpreter exit instead, where they sometimes abort a finished rank (SIGABRT,
    "terminate called without an active exception"). Imported first, the defaults hold None.
    """
    if dist.is_available():
        import torch.distributed.nn  # noqa: F401


def shutdown() -> None:
    """Leave the group cleanly: wait for every rank, so none tears down sockets a peer still reads."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a peer already died: nothing left to wait for
            pass
        dist.destroy_process_group()
