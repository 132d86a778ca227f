"""Ranks under ``torchrun``: the process group, the device, DDP wrapping and each rank's share of the data.

Under ``torchrun`` (``WORLD_SIZE > 1``) :meth:`Ranks.from_environment` initialises the process
group (NCCL on CUDA, Gloo on CPU) unless it already is.  Each rank gets a disjoint share of
every pass over a data set: batch ``i`` goes to rank ``i % world_size`` (training drops the
last ``len % world_size`` batches so that every rank makes the same number of updates);
batches flagged ``"stream": True`` (BPTT streams whose state must follow consecutive batches)
are instead split by rows, every rank taking its slice of every batch.  A single process is
``Ranks()``: world size 1, rank 0, every collective a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DataSource", "Ranks", "is_stream", "resolve_device", "to_device"]


class DataSource(Protocol):
    """What the trainer needs of a data set: a length in batches and a reproducible order.

    ``iterate(epoch, start=0)`` yields batches: dicts whose tensors are moved to the device and
    whose other values (``"stream": True``, ids...) are passed as they are.  The order of epoch
    ``e`` must be a function of the data object's seed and ``e`` only, and ``start`` skips the
    first ``start`` batches of that order (resuming mid-epoch).
    """

    def __len__(self) -> int: ...

    def iterate(self, epoch: int, start: int = 0) -> Iterator[Mapping[str, Any]]: ...


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; under torchrun CUDA means ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def is_stream(data: DataSource) -> bool:
    """Whether ``data`` holds stream batches: its ``stream`` attribute, else its first batch."""
    flag = getattr(data, "stream", None)
    if flag is None:
        first = next(iter(data.iterate(0)), None)
        flag = first is not None and first.get("stream", False)
    return bool(flag)


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world_size`` ranks, and the collectives the trainer uses."""

    world_size: int = 1
    rank: int = 0

    @classmethod
    def from_environment(cls, device: torch.device) -> Ranks:
        """The initialised process group, or one initialised from torchrun's environment."""
        if not dist.is_available():
            return cls()
        if not dist.is_initialized():
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
                return cls()
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_world_size(), dist.get_rank())

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and reports progress."""
        return self.rank == 0

    def wrap(self, model: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
        """``model`` in ``DistributedDataParallel`` over the ranks (the model itself on one rank)."""
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device] if device.type == "cuda" else None
        return DistributedDataParallel(
            model, device_ids=ids, output_device=device if ids else None, find_unused_parameters=find_unused_parameters
        )

    # ---- data -----------------------------------------------------------------------------------
    def num_batches(self, data: DataSource, *, train: bool, stream: bool) -> int:
        """Batches this rank processes in one pass over ``data`` (``stream``: split by rows)."""
        n, w = len(data), self.world_size
        if w == 1 or stream:
            return n
        return n // w if train else len(range(self.rank, n, w))

    def rows(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """This rank's slice of the rows of a stream batch (tensors whose first dim is the batch)."""
        lengths = batch.get("lengths")
        if isinstance(lengths, Tensor):
            size = lengths.shape[0]
        else:
            size = next(v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim())
        if size < self.world_size:
            raise ValueError(f"a stream batch of {size} rows cannot be split over {self.world_size} ranks")
        return {
            k: v.tensor_split(self.world_size)[self.rank]
            if isinstance(v, Tensor) and v.dim() and v.shape[0] == size
            else v
            for k, v in batch.items()
        }

    def batches(self, data: DataSource, epoch: int, start: int, train: bool) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield ``(position after this batch, this rank's batch)`` from position ``start``.

        Positions count batches of the epoch's order consumed by all ranks together, so they
        agree across ranks.
        """
        w, r = self.world_size, self.rank
        limit = (len(data) // w) * w if train else len(data)
        for index, batch in enumerate(data.iterate(epoch, start=start), start):
            if w == 1:
                yield index + 1, dict(batch)
            elif batch.get("stream", False):
                yield index + 1, self.rows(batch)
            elif index >= limit:
                return
            elif index % w == r:
                yield (index // w + 1) * w, dict(batch)

    # ---- collectives ----------------------------------------------------------------------------
    def sum(self, totals: Mapping[str, float]) -> dict[str, float]:
        """Each entry summed over the ranks (keys missing on a rank count as 0)."""
        out: dict[str, float] = {}
        for part in self.gather(dict(totals)):
            for k, v in part.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def maximum(self, value: Tensor) -> Tensor:
        """``value`` (a tensor on this rank's device) replaced by its maximum over the ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world_size > 1:
            dist.barrier()


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with its tensors on ``device`` (non-blocking on CUDA); other values as they are."""
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v for k, v in batch.items()}
