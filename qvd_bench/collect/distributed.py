"""Merging accumulators across processes with torch.distributed.

Each process collects statistics for its shard of the samples; ``merge_across_processes``
gathers every rank's accumulators and merges them so that every rank ends up with the
statistics of all samples, as one process would have computed them (exactly for counts,
extrema, histograms, reservoirs and temporal features; moments to float64 rounding).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TypeVar

import torch
import torch.distributed as dist

from qvd_bench.collect.accumulator import ACCUMULATORS, Accumulator

K = TypeVar("K", bound=Hashable)


def merge_across_processes(
    accumulators: dict[K, Accumulator], group: dist.ProcessGroup | None = None
) -> dict[K, Accumulator]:
    """Merges the accumulators of all ranks; the result is returned on every rank.

    Every rank sends the CPU state dicts of its accumulators to all ranks
    (``all_gather_object``), so each rank holds world_size copies of the state for a
    moment. Each key present on any rank is merged in rank order (rank 0 first), which
    makes the result identical on all ranks. Keys are hashable, e.g.
    (layer, timestep value, branch); a key's accumulators must have the same type and
    configuration on every rank that has it (else ValueError).

    With NCCL, object collectives go through the current CUDA device: call
    ``torch.cuda.set_device`` first (a torch.distributed requirement).

    Args:
        accumulators: this rank's key -> accumulator.
        group: the process group; the default group when None.

    Returns:
        key -> merged accumulator, a new dict over the union of the keys in first-seen
        order (rank 0's keys first). An accumulator that exists on this rank keeps its
        device; the others are on the CPU. The inputs are not modified. When
        torch.distributed is not initialised, ``accumulators`` is returned unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return accumulators
    payload = {
        key: (type(acc).__name__, {k: v.detach().cpu() for k, v in acc.state_dict().items()})
        for key, acc in accumulators.items()
    }
    gathered: list[dict] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
    dist.all_gather_object(gathered, payload, group=group)

    merged: dict[K, Accumulator] = {}
    for rank_payload in gathered:
        for key, (kind, state) in rank_payload.items():
            if kind not in ACCUMULATORS:
                raise ValueError(f"unknown accumulator type {kind!r} for key {key!r}")
            acc = ACCUMULATORS[kind].from_state_dict(state)
            if key in merged:
                merged[key].merge(acc)
            else:
                merged[key] = acc
    for key, acc in merged.items():
        local = accumulators.get(key)
        if local is not None and local.device != torch.device("cpu"):
            acc.to(local.device)
    return merged


def rank_and_world(device: str = "cpu") -> tuple[int, int]:
    """This process's rank and the world size, joining the process group if launched so.

    Under ``torchrun`` (WORLD_SIZE > 1 in the environment) the default process group is
    initialised from the environment on first call: gloo for CPU runs, nccl for CUDA.
    Otherwise the run is a single process: (0, 1).
    """
    import os

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()
