"""Data builders shared by the accumulator tests."""

from __future__ import annotations

import torch

from qvd_bench.collect.reservoir import Reservoir


def copy(acc):
    return type(acc).from_state_dict(acc.state_dict())


def embedding(t: torch.Tensor, dim: int = 6) -> torch.Tensor:
    freqs = torch.arange(1, dim + 1, dtype=torch.float64)
    return torch.sin(t.double()[:, None] * freqs / 100)


RES_C, RES_CAP = 3, 20


def sample_rows(sample_id: int, timestep: float, branch: int, rows: int = 9) -> torch.Tensor:
    """Deterministic (rows, C) data for one sample and call."""
    g = torch.Generator().manual_seed(sample_id * 1000 + int(timestep) * 2 + branch)
    return torch.randn(rows, RES_C, generator=g)


CALLS = [(t, b) for t in (999.0, 500.0, 1.0) for b in (0, 1)]


def fill(res: Reservoir, samples, calls=CALLS, batch: int = 2) -> Reservoir:
    for t, b in calls:
        for i in range(0, len(samples), batch):
            ids = samples[i : i + batch]
            rows = torch.stack([sample_rows(s, t, b) for s in ids])
            res.update(rows, torch.tensor(ids), t, b)
    return res
