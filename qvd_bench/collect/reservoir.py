"""``Reservoir``: a bounded sample of input rows, the same whatever the batching.

Each row is keyed by a 63-bit hash of (seed, sample id, timestep, branch, row)
(``row_key``, splitmix64's finaliser folded over the fields), and the reservoir keeps the
rows of the smallest keys (bottom-k), so the kept set depends only on the set of rows
seen.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence

import torch
from torch import Tensor

from qvd_bench.collect.accumulator import Accumulator

F64 = torch.float64
I64 = torch.int64


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (``>>`` is arithmetic), as a new tensor."""
    return (z >> s).bitwise_and_((1 << (64 - s)) - 1)


def _mix64_(z: Tensor) -> Tensor:
    """splitmix64's finaliser, a bijection on 64 bits (int64 arithmetic wraps mod 2^64).

    Works in place on ``z`` (a temporary of the caller's), and returns it.
    """
    z ^= _shr(z, 30)
    z *= _MIX1
    z ^= _shr(z, 27)
    z *= _MIX2
    z ^= _shr(z, 31)
    return z


def _fold_int(h: int, field: int) -> int:
    """One step h = mix((h XOR f) + golden) of ``row_key`` in Python ints.

    h is the unsigned value in [0, 2^64); ``field`` may be negative (its int64 bits).
    Masking to 64 bits after each + and × gives int64's wrap-around, and ``>>`` of an
    unsigned value is the logical shift.
    """
    z = ((h ^ field) + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _timestep_bits(timestep: float) -> int:
    """The bits of a float64 timestep as a signed int (−0.0 as 0.0)."""
    return struct.unpack("=q", struct.pack("=d", float(timestep) + 0.0))[0]


def _key_prefix(seed: int, sample_id: int, timestep: float, branch: int) -> int:
    """h of ``row_key`` after every field but the row, as a signed (int64) value."""
    h = seed & _MASK64
    for field in (sample_id, _timestep_bits(timestep), branch):
        h = _fold_int(h, field)
    return _signed(h)


def _finish_key(prefix: Tensor | int, row: Tensor) -> Tensor:
    """The key from the prefix h and the row: mix((h XOR row) + golden), low 63 bits."""
    return _mix64_((prefix ^ row).add_(_GOLDEN)).bitwise_and_(_MASK63)


@functools.lru_cache(maxsize=4)
def _call_keys(
    seed: int, sample_ids: tuple[int, ...], timestep: float, branch: int, rows: int, device
) -> Tensor:
    """(n·R,) the keys of every row of one denoiser call's samples, sample-major.

    Only the row varies among a sample's rows: the other fields are folded once per sample
    on the host, and the keys take one vector mix. Every layer of a call with as many rows
    gets the same keys, so they are kept for the next layers (callers never modify them).
    """
    prefixes = [_key_prefix(seed, s, timestep, branch) for s in sample_ids]
    row_index = torch.arange(rows, dtype=I64, device=device)
    prefix = torch.tensor(prefixes, dtype=I64, device=device)
    return _finish_key(prefix[:, None], row_index[None, :]).reshape(-1)


def row_key(
    seed: int,
    sample_id: Tensor | int,
    timestep: float,
    branch: Tensor | int,
    row: Tensor | int,
) -> Tensor:
    """The 63-bit sampling key of a row; identical on every device and for any batching.

    h = seed, then for each field f of (sample_id, bits of float64 timestep, branch, row):
    h = mix((h XOR f) + 0x9E3779B97F4A7C15) with mix = splitmix64's finaliser, all mod
    2^64; the key is the low 63 bits of h (a non-negative int64).

    When sample_id and branch are ints, the fields before the row are folded on the host
    in exact integer arithmetic and only the last step runs on tensors.

    Args:
        seed: the collection seed.
        sample_id, branch, row: int64 tensors (broadcast together) or ints.
        timestep: the timestep value (−0.0 hashes as 0.0).

    Returns:
        int64 tensor of the broadcast shape, on the device of ``sample_id`` (of ``row``
        when ``sample_id`` and ``branch`` are ints).
    """
    if isinstance(sample_id, int) and isinstance(branch, int):
        prefix = _key_prefix(seed, sample_id, timestep, branch)
        return _finish_key(prefix, torch.as_tensor(row, dtype=I64))
    sample_id = torch.as_tensor(sample_id, dtype=I64)
    device = sample_id.device
    h = torch.full((), seed, dtype=I64, device=device)
    for field in (
        sample_id,
        _timestep_bits(timestep),
        torch.as_tensor(branch, device=device),
        torch.as_tensor(row, device=device),
    ):
        h = _mix64_((h ^ field) + _GOLDEN)
    return h & _MASK63


def _lexsort(columns: Sequence[Tensor]) -> Tensor:
    """Permutation sorting by columns[0], then columns[1], ... (all ascending)."""
    order = torch.arange(columns[0].numel(), device=columns[0].device)
    for col in reversed(columns):
        order = order[torch.sort(col[order], stable=True).indices]
    return order


ROW_ID_FIELDS = ("keys", "sample_ids", "timesteps", "branches", "row_indices")


def _bottom_k(ids: dict[str, Tensor], k: int) -> Tensor:
    """Positions of the k smallest distinct (key, sample_id, timestep, branch, row).

    Equal rows have equal keys, so the tie-breaking sort and the de-duplication are only
    needed when some key occurs twice (rare with 63-bit keys). Among equal rows the
    earliest position wins.
    """
    keys = ids["keys"]
    order = torch.sort(keys, stable=True).indices
    sorted_keys = keys[order]
    if not bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
        return order[:k]
    columns = [ids[f] for f in ROW_ID_FIELDS]
    order = _lexsort(columns)
    columns = [c[order] for c in columns]
    distinct = torch.ones_like(order, dtype=torch.bool)
    same = torch.ones_like(distinct[1:])
    for c in columns:
        same &= c[1:] == c[:-1]
    distinct[1:] = ~same
    return order[distinct][:k]


class Reservoir(Accumulator):
    """A bounded bottom-k sample of input rows.

    Every row gets the key ``row_key(seed, sample_id, timestep, branch, row)``; the
    reservoir keeps the ``capacity`` rows with the smallest (key, sample_id, timestep,
    branch, row). The kept set is a function of the set of rows seen, so it does not
    depend on batching, sharding or the order of updates and merges. A row is identified
    by (sample_id, timestep, branch, row): seeing it twice keeps one copy.

    Rows live in slots: an update writes its few winning rows over the evicted ones in
    place instead of rebuilding the (k, C) table. ``state_dict`` returns the canonical
    form, sorted by (key, sample_id, timestep, branch, row) (copies, not the live slots).

    Args:
        capacity: rows kept, k.
        channels: C, the length of a row.
        seed: the key seed.
        device: where the state starts; it follows the inputs of ``update``.

    State: config (3,) int64 [capacity, channels, seed]; rows (k', C) float32; keys,
    sample_ids, branches, row_indices (k',) int64; timesteps (k',) float64; k' ≤ k.
    """

    STATE = ("config", "rows", *ROW_ID_FIELDS)

    def __init__(
        self, capacity: int, channels: int, seed: int, device: torch.device | str | None = None
    ):
        if capacity < 1 or channels < 1:
            raise ValueError(f"capacity and channels must be >= 1, got {capacity}, {channels}")
        self.config = torch.tensor([capacity, channels, seed], dtype=I64, device=device)
        self.rows = torch.zeros(0, channels, dtype=torch.float32, device=device)
        for name in ROW_ID_FIELDS:
            dtype = F64 if name == "timesteps" else I64
            setattr(self, name, torch.zeros(0, dtype=dtype, device=device))

    @property
    def capacity(self) -> int:
        return int(self.config[0])

    @property
    def channels(self) -> int:
        return int(self.config[1])

    @property
    def seed(self) -> int:
        return int(self.config[2])

    def __len__(self) -> int:
        return self.keys.shape[0]

    def state_dict(self) -> dict[str, Tensor]:
        """The state in canonical order (new tensors)."""
        order = _lexsort([getattr(self, f) for f in ROW_ID_FIELDS])
        return {"config": self.config, **{k: getattr(self, k)[order] for k in self.STATE[1:]}}

    def _validate(self) -> None:
        n = self.keys.shape[0]
        if self.config.shape != (3,) or self.rows.shape != (n, self.channels) or n > self.capacity:
            raise ValueError("Reservoir state has inconsistent shapes")
        if any(getattr(self, k).shape != (n,) for k in ROW_ID_FIELDS):
            raise ValueError("Reservoir state has inconsistent shapes")

    def update(
        self, rows: Tensor, sample_ids: Tensor | Sequence[int], timestep: float, branch: int
    ) -> None:
        """Offers the rows of one call.

        Args:
            rows: (n, R, C): R rows (tokens, positions) of each of n samples; or
                (n, ..., C), any view, whose middle axes flattened (in order) are the R
                rows: only the rows kept are gathered (a conv input's channel-last view
                is never copied whole).
            sample_ids: (n,) global sample ids, ints or an int64 tensor. The keys are
                hashed from them on the host, so a device tensor costs a host sync.
            timestep: the timestep value of the call.
            branch: the CFG branch index.
        """
        if rows.ndim < 3 or rows.shape[-1] != self.channels:
            raise ValueError(f"expected rows (n, R, {self.channels}), got {tuple(rows.shape)}")
        if rows.device != self.device:
            self.to(rows.device)
        n, r = rows.shape[0], math.prod(rows.shape[1:-1])
        device = rows.device
        ids = torch.as_tensor(sample_ids, dtype=I64)
        if ids.shape != (n,):
            raise ValueError(f"expected sample_ids ({n},), got {tuple(ids.shape)}")
        keys = _call_keys(self.seed, tuple(ids.tolist()), float(timestep), int(branch), r, device)
        # Only keys at or below the current k-th key, and among the k smallest new keys,
        # can be kept: the other rows are never copied. Once the reservoir is full, few
        # keys pass the first test, and the k-th new key is only sought among those.
        picked = None  # every row
        if len(self) == self.capacity:
            picked = (keys <= self.keys.max()).nonzero().squeeze(1)
        if (keys.numel() if picked is None else picked.numel()) > self.capacity:
            candidates = keys if picked is None else keys[picked]
            kth = torch.kthvalue(candidates, self.capacity).values
            picked = (keys <= kth).nonzero().squeeze(1)
        if picked is None:
            picked = torch.arange(keys.numel(), device=device)
        elif picked.numel() == 0:
            return
        m = picked.numel()
        sample_index = picked // r
        if rows.ndim == 3 or rows.is_contiguous():
            kept = rows.detach().reshape(n, r, self.channels)[sample_index, picked % r]
        else:
            position = torch.unravel_index(picked % r, rows.shape[1:-1])
            kept = rows.detach()[(sample_index, *position)]
        self._insert(
            {
                "rows": kept.to(torch.float32),
                "keys": keys[picked],
                "sample_ids": ids.to(device)[sample_index],
                "timesteps": torch.full((m,), float(timestep), dtype=F64, device=device),
                "branches": torch.full((m,), int(branch), dtype=I64, device=device),
                "row_indices": picked % r,
            }
        )

    def merge(self, other: Reservoir) -> Reservoir:
        """Union, then bottom-k; returns self."""
        other = self._mergeable(other)
        if not torch.equal(other.config, self.config):
            raise ValueError(
                f"cannot merge a reservoir with [capacity, channels, seed] "
                f"{other.config.tolist()} into {self.config.tolist()}"
            )
        self._insert({k: getattr(other, k) for k in self.STATE[1:]})
        return self

    def _insert(self, new: dict[str, Tensor]) -> None:
        """Keeps the bottom-k of the current slots and the ``new`` rows."""
        size = len(self)
        ids = {f: torch.cat([getattr(self, f), new[f]]) for f in ROW_ID_FIELDS}
        keep = _bottom_k(ids, self.capacity)
        kept = torch.zeros(size + new["keys"].numel(), dtype=torch.bool, device=self.device)
        kept[keep] = True
        # Each kept new row takes an evicted slot; the rest are appended (filling up).
        # There are never more evicted slots than kept new rows: the old rows are distinct.
        evicted = (~kept[:size]).nonzero().squeeze(1)
        incoming = kept[size:].nonzero().squeeze(1)
        reuse = evicted.numel()
        slots, src, extra = evicted, incoming[:reuse], incoming[reuse:]
        for name in self.STATE[1:]:
            field = getattr(self, name)
            field[slots] = new[name][src]
            if extra.numel():
                field = torch.cat([field, new[name][extra]])
            setattr(self, name, field)
