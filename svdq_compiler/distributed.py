"""Calibration shared among processes with torch.distributed (gloo on CPU, nccl on GPU).

Started with `torchrun --nproc-per-node N …`: every process builds the same graph, runs the calibration inputs
whose index i has i mod N equal to its rank, and the statistics are merged before any pass reads them, so
every process then compiles the same model. The merge is exact: per-channel minima and maxima are reduced with
MIN and MAX, rows seen are summed, and each site's reservoir keeps the rows with the largest keys of all
processes' reservoirs — the keys depend on (seed, site, input index) only (`recording.reservoir_keys`),
so the merged statistics are those of one process running every input. Without an initialised process group
(or with one process) every function here is the identity.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

from svdq_compiler.calibration import SiteStats
from svdq_compiler.recording import keep_largest_keys

T = TypeVar("T")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def init_from_environment() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): nccl when CUDA is there,
    gloo otherwise. Returns whether this process is one of several."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return active()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return active()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def share(indexed: Iterable[tuple[int, T]]) -> Iterator[tuple[int, T]]:
    """This process's share of (index, input) pairs: those whose index modulo the world size is its rank."""
    if not active():
        yield from indexed
        return
    for index, item in indexed:
        if index % world_size() == rank():
            yield index, item


def total(count: int) -> int:
    """`count` summed over the processes."""
    if not active():
        return count
    value = torch.tensor([count], dtype=torch.int64, device=_device())
    dist.all_reduce(value)
    return int(value.item())


def merge_sites(sites: dict[str, SiteStats], limit: int) -> None:
    """Merge every process's statistics of `sites` into each process's (module doc), in place. Every process
    must call it with the same site names in the same order."""
    if not active():
        return
    device, world = _device(), dist.get_world_size()
    for stats in sites.values():
        home = stats.minimum.device
        minimum, maximum = stats.minimum.to(device), stats.maximum.to(device)
        dist.all_reduce(minimum, dist.ReduceOp.MIN)
        dist.all_reduce(maximum, dist.ReduceOp.MAX)
        stats.minimum, stats.maximum = minimum.to(home), maximum.to(home)
        stats.rows_seen = total(stats.rows_seen)
        # Reservoirs differ in length: each is padded to `limit` rows, with its length sent alongside.
        count = stats.rows.shape[0]
        keys = torch.full((limit,), -1.0, device=device)
        rows = torch.zeros(limit, stats.rows.shape[1], dtype=stats.rows.dtype, device=device)
        keys[:count], rows[:count] = stats.priorities.to(device), stats.rows.to(device)
        counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([count], dtype=torch.int64, device=device))
        all_keys = [torch.empty_like(keys) for _ in range(world)]
        all_rows = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(all_keys, keys)
        dist.all_gather(all_rows, rows)
        stats.priorities = torch.empty(0, device=stats.priorities.device)
        stats.rows = stats.rows[:0]
        for n, gathered_keys, gathered_rows in zip(counts, all_keys, all_rows):
            n = int(n.item())
            keep_largest_keys(stats, gathered_keys[:n].to(home), gathered_rows[:n].to(home), limit)
