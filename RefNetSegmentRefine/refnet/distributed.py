"""torch.distributed for RefNet training, set up from torchrun's environment (one process per device).

``torchrun --nproc_per_node N refnet train ...`` (or multi-node torchrun, or a SLURM job that starts it)
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` reads
them, chooses NCCL for CUDA and gloo otherwise, and gives each process its GPU. Without them training
runs in one process as before.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Distributed", "setup"]

_NEEDED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that logs, validates and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_mean(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Each value averaged over the processes (for logging the whole job's loss)."""
        if self.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}


def setup(device: str = "auto") -> tuple[Distributed, str]:
    """Join the torchrun job described by the environment, if there is one.

    Returns:
        ``(Distributed, device)``: the device to use (``cuda:LOCAL_RANK`` on a GPU job).

    Raises:
        ValueError: a half-set environment (e.g. ``WORLD_SIZE`` without ``MASTER_ADDR``), naming what is missing.
    """
    present = [k for k in _NEEDED if k in os.environ]
    if not present or (int(os.environ.get("WORLD_SIZE", "1")) == 1 and len(present) < len(_NEEDED)):
        return Distributed(), device
    missing = [k for k in _NEEDED if k not in os.environ]
    if missing:
        raise ValueError(f"distributed training needs {', '.join(_NEEDED)}; {', '.join(missing)} is not set. Start "
                         "the job with torchrun (e.g. torchrun --nproc_per_node 2 refnet train ...), or unset "
                         f"{', '.join(present)} to train in one process.")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        # Left to interpreter shutdown, gloo's worker threads can still hold work and abort the process
        # ("terminate called without an active exception", SIGABRT; pytorch/pytorch#179291): the job then
        # fails after training has finished. Destroying the group at exit, before shutdown, avoids it.
        atexit.register(_destroy)
    return Distributed(rank, world, local), device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
