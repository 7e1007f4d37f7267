"""This process's part of an evaluation under ``torchrun`` (torch.distributed, gloo on CPU).

The prompts are sharded across the processes as ``collect`` shards them (prompt i on rank
i mod N); rank 0 gathers the per-prompt generations, measures and writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from qvd_bench.evaluate.generate import Generation


@dataclass(frozen=True)
class Shard:
    """This process's part of a (possibly multi-process) evaluation.

    Attributes:
        rank: this process's rank (0 for a single process).
        world: the number of processes.
    """

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """True on rank 0, the process that measures and writes."""
        return self.rank == 0

    def prompts(self, count: int) -> list[int]:
        """This process's prompt indices out of ``count``: i with i mod world == rank (the
        split ``collect`` uses)."""
        return [i for i in range(count) if i % self.world == self.rank]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, local: dict[int, Generation], count: int) -> list[Generation] | None:
        """Every process's generations, in prompt order, on rank 0 (None elsewhere).

        Args:
            local: prompt index -> this process's generation of it.
            count: the number of prompts (their indices are 0..count-1 across processes).
        """
        if self.world == 1:
            return [local[i] for i in range(count)]
        payload = {i: g.tensors() for i, g in local.items()}
        gathered: list[dict] | None = [{}] * self.world if self.main else None
        dist.gather_object(payload, gathered, dst=0)
        if not self.main:
            return None
        merged = {i: t for part in gathered for i, t in part.items()}
        return [Generation.from_tensors(merged[i]) for i in range(count)]

    def total(self, *values: int) -> tuple[int, ...]:
        """The sums over processes of some per-process counts."""
        if self.world == 1:
            return values
        summed = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(summed)
        return tuple(int(v) for v in summed)
