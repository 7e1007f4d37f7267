"""``TemporalFeatures``: the input vectors of timestep-embedding layers, one per timestep."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qvd_bench.collect.accumulator import Accumulator

F64 = torch.float64


class TemporalFeatures(Accumulator):
    """Full input vectors of a timestep-embedding layer, one per timestep value.

    The vectors depend on the timestep only, so a timestep seen twice must carry the same
    vector: max|a − b| ≤ 1e-6·max|b| over the vector, else ValueError. The vector seen first
    is kept.

    State: timesteps (T,) float64, sorted ascending; vectors (T, D) float64.
    """

    STATE = ("timesteps", "vectors")
    RTOL = 1e-6

    def __init__(self, device: torch.device | str | None = None):
        self.timesteps = torch.zeros(0, dtype=F64, device=device)
        self.vectors = torch.zeros(0, 0, dtype=F64, device=device)

    def _validate(self) -> None:
        if self.timesteps.ndim != 1 or self.vectors.ndim != 2:
            raise ValueError("TemporalFeatures state needs timesteps (T,) and vectors (T, D)")
        if self.vectors.shape[0] != self.timesteps.shape[0]:
            raise ValueError("TemporalFeatures: timesteps and vectors differ in length")

    def update(self, vectors: Tensor, timesteps: Tensor | Sequence[float]) -> None:
        """Adds vectors (N, D) recorded at timesteps (N,)."""
        vectors = vectors.detach()
        if vectors.device != self.device:
            self.to(vectors.device)
        timesteps = torch.as_tensor(timesteps, device=vectors.device).detach().to(F64)
        if vectors.ndim != 2 or timesteps.shape != (vectors.shape[0],):
            raise ValueError(
                f"expected vectors (N, D) and timesteps (N,), got {tuple(vectors.shape)} and "
                f"{tuple(timesteps.shape)}"
            )
        if not bool(torch.isfinite(timesteps).all()):
            raise ValueError("timesteps must be finite")
        self._union(timesteps, vectors.to(F64))

    def merge(self, other: TemporalFeatures) -> TemporalFeatures:
        """Union of the timesteps; returns self."""
        other = self._mergeable(other)
        self._union(other.timesteps, other.vectors)
        return self

    def _union(self, timesteps: Tensor, vectors: Tensor) -> None:
        if timesteps.numel() == 0:
            return
        if self.timesteps.numel() == 0:
            old_v = vectors.new_zeros(0, vectors.shape[1])
        elif vectors.shape[1] != self.vectors.shape[1]:
            raise ValueError(
                f"cannot add vectors of dimension {vectors.shape[1]} to {self.vectors.shape[1]}"
            )
        else:
            old_v = self.vectors
        ts = torch.cat([self.timesteps, timesteps])
        vs = torch.cat([old_v, vectors])
        ts, order = torch.sort(ts, stable=True)
        vs = vs[order]
        first = torch.ones_like(ts, dtype=torch.bool)
        first[1:] = ts[1:] != ts[:-1]
        group = first.cumsum(0) - 1
        reference = vs[first][group]
        diff = (vs - reference).abs().amax(1)
        scale = reference.abs().amax(1)
        bad = ~(diff <= self.RTOL * scale)
        if bool(bad.any()):
            t = ts[bad][0].item()
            raise ValueError(f"timestep {t} carries two different vectors")
        self.timesteps, self.vectors = ts[first], vs[first]

    def as_matrix(self) -> tuple[Tensor, Tensor]:
        """Returns (timesteps (T,) ascending, vectors (T, D))."""
        return self.timesteps, self.vectors
