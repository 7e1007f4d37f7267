"""Drives a denoiser over a sampling schedule, and describes each denoiser call.

``CallTracker`` is a forward pre-hook on the denoiser. Before every call it records
the timestep value, which CFG branch each chunk of the batch is, and the global sample
ids of the samples in it, so that layer hooks can key their statistics by
(layer, timestep value, branch) without knowing who called the denoiser (the minimal
sampler below or a diffusers pipeline).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

BRANCHES: tuple[str, ...] = ("uncond", "cond")


@dataclass(frozen=True)
class DenoiserCall:
    """What one denoiser call computes.

    Attributes:
        timestep: the timestep value of the call (of its first sample).
        branches: one CFG branch name per equal chunk along dim 0 of every layer
            input: ("uncond", "cond") for a batched CFG call, ("cond",) otherwise.
        sample_ids: global ids of the samples in each chunk (the same for every chunk).
    """

    timestep: float
    branches: tuple[str, ...]
    sample_ids: tuple[int, ...]


class CallTracker:
    """Pre-forward hook on the denoiser that publishes a ``DenoiserCall`` per call.

    The sampler announces the samples of the current batch with ``batch(ids)`` and,
    when it runs the CFG branches as separate forwards, the branch with ``branch(name)``.
    A call whose batch is twice the number of samples is a batched [uncond, cond] call
    (diffusers pipelines do this); it is split into two chunks.
    """

    def __init__(self, denoiser: nn.Module):
        self.denoiser = denoiser
        self.current: DenoiserCall | None = None
        self._sample_ids: tuple[int, ...] = (0,)
        self._branch = "cond"
        self._handle = None

    def attach(self) -> CallTracker:
        if self._handle is None:
            self._handle = self.denoiser.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.current = None

    @contextlib.contextmanager
    def batch(self, sample_ids: Sequence[int]) -> Iterator[None]:
        """Announces the global ids of the samples the next calls compute."""
        previous = self._sample_ids
        self._sample_ids = tuple(int(i) for i in sample_ids)
        try:
            yield
        finally:
            self._sample_ids = previous

    @contextlib.contextmanager
    def branch(self, name: str) -> Iterator[None]:
        """Announces the CFG branch of the next (unbatched) calls."""
        if name not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {name!r}")
        previous = self._branch
        self._branch = name
        try:
            yield
        finally:
            self._branch = previous

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if timestep is None:
            raise RuntimeError("the denoiser was called without a timestep")
        value = float(torch.as_tensor(timestep).reshape(-1)[0])
        n = len(self._sample_ids)
        batch = sample.shape[0]
        if batch == 2 * n:
            branches = BRANCHES
        elif batch == n:
            branches = (self._branch,)
        else:
            raise RuntimeError(
                f"denoiser batch {batch} matches neither {n} samples nor 2 x {n} (CFG)"
            )
        self.current = DenoiserCall(value, branches, self._sample_ids)
