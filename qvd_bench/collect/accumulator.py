"""The base of the streaming, mergeable statistics of layer inputs.

Every accumulator follows one pattern (the shape of torchmetrics' ``Metric``): its state
is a fixed set of tensors declared once (``STATE``, returned by ``state_dict``), ``update``
folds a batch into it, ``merge`` folds another accumulator of the same configuration into
it, ``compute`` (where there is more to say than the state) gives the results, and
``merge`` of partial results equals one pass over all the data. The state holds
sufficient statistics only, so merges are exact (counts, extrema, histogram bins,
reservoirs) or exact up to float64 rounding (moments), and the state is independent of
how the data was batched, sharded or ordered.

State is float64 except integer counts (and the float32 rows of a reservoir), lives on
the device of the inputs, and is made of tensors only, so ``state_dict()`` can be written
with safetensors and read back with ``from_state_dict``. ``state_dict`` returns the live
tensors (the reservoir: sorted copies); ``from_state_dict`` copies. Merging accumulators
of different type, shape or configuration raises ValueError.

Every subclass is registered by class name in ``ACCUMULATORS``, so that a state sent to
another process can be rebuilt there (``collect.distributed``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

# Class name -> accumulator class, filled by ``Accumulator.__init_subclass__``.
ACCUMULATORS: dict[str, type[Accumulator]] = {}


class Accumulator:
    """Base of the mergeable accumulators: a declared set of state tensors.

    Subclasses list their state in ``STATE`` and keep each as an attribute of that name;
    the configuration (channels, edges, capacity, ...) is part of the state, so
    ``from_state_dict`` needs nothing else.
    """

    STATE: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        ACCUMULATORS.setdefault(cls.__name__, cls)

    def state_dict(self) -> dict[str, Tensor]:
        """The state tensors by name (the live tensors, not copies)."""
        return {name: getattr(self, name) for name in self.STATE}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]):
        """Rebuilds an accumulator from ``state_dict()`` output (copied, same device)."""
        missing = [k for k in cls.STATE if k not in state]
        extra = [k for k in state if k not in cls.STATE]
        if missing or extra:
            raise ValueError(f"{cls.__name__} state: missing {missing}, unexpected {extra}")
        obj = cls.__new__(cls)
        for name in cls.STATE:
            setattr(obj, name, state[name].detach().clone())
        obj._validate()
        return obj

    def _validate(self) -> None:
        """Checks a loaded state for consistency; raises ValueError."""

    @property
    def device(self) -> torch.device:
        return getattr(self, self.STATE[0]).device

    def to(self, device: torch.device | str):
        """Moves the state to ``device`` in place; returns self."""
        for name in self.STATE:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Folds a batch of data into the state."""
        raise NotImplementedError

    def merge(self, other):
        """Folds another accumulator of the same configuration into this one; returns self."""
        raise NotImplementedError

    def _mergeable(self, other: Accumulator):
        """Checks the type; returns ``other``, copied to this device if it lives elsewhere."""
        if type(other) is not type(self):
            raise ValueError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        if other.device != self.device:
            other = type(other).from_state_dict(
                {k: v.to(self.device) for k, v in other.state_dict().items()}
            )
        return other


class RowCount(Accumulator):
    """A count of rows, mergeable and checkpointed like the statistics: the rows a layer
    left out (tokens at another noise level), so that a resumed or sharded collection
    counts every one.

    State:
        count: () int64.
    """

    STATE = ("count",)

    def __init__(self) -> None:
        self.count = torch.zeros((), dtype=torch.int64)

    def update(self, rows: int) -> None:
        """Adds ``rows``."""
        self.count += int(rows)

    def merge(self, other: RowCount) -> RowCount:
        self.count += self._mergeable(other).count
        return self

    def __int__(self) -> int:
        return int(self.count)
