"""What a stage of work costs: wall time and peak host and device memory.

``measure_stage`` is the one place that measures a stage; ``collect``, ``quantize``,
``sensitivity`` and ``evaluate`` record what it measures in their outputs.

Peak host memory is the process's resident-set high-water mark (``VmHWM``), which torch's
allocations count in (``tracemalloc`` sees only Python's). On Linux the mark is reset when
a stage starts (writing 5 to ``/proc/self/clear_refs``), so a stage's peak is its own;
where that is not possible it is the process's peak so far (``ru_maxrss``), an upper bound,
and ``host_scope`` says "process". Peak device memory is ``torch.cuda.max_memory_allocated``
on a CUDA device (reset when a stage starts) and None elsewhere. Stages nest: an inner
stage's reset first folds the peak so far into every enclosing stage.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


@dataclass
class StageCost:
    """The cost of one stage (filled in when the stage ends).

    Attributes:
        stage: the stage's name ("sample", "quantize", ...).
        wall_s: wall-clock seconds.
        peak_host_bytes: peak resident memory of the process during the stage.
        peak_device_bytes: peak memory allocated by torch on the CUDA device during the
            stage; None when the stage does not run on CUDA.
        host_scope: "stage" when the host peak is the stage's own, "process" when it is
            the process's peak up to the end of the stage (the mark could not be reset).
    """

    stage: str
    wall_s: float = 0.0
    peak_host_bytes: int | None = None
    peak_device_bytes: int | None = None
    host_scope: str = "stage"
    _device: torch.device | None = field(default=None, repr=False)
    _started: float = field(default=0.0, repr=False)

    def to_dict(self) -> dict:
        """The public fields, JSON-safe."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


# Stages open now, outermost first.
_open: list[StageCost] = []


def _host_peak() -> int:
    """The resident-set high-water mark of this process, bytes."""
    try:
        with open(_STATUS) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_host_peak() -> bool:
    """Resets the high-water mark to the current resident set; False where it cannot."""
    try:
        with open(_CLEAR_REFS, "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _device_peak(device: torch.device | None) -> int | None:
    if device is None:
        return None
    return int(torch.cuda.max_memory_allocated(device))


def _fold_peaks() -> None:
    """Folds the current peaks into every open stage (before a reset)."""
    host = _host_peak()
    for stage in _open:
        stage.peak_host_bytes = max(stage.peak_host_bytes or 0, host)
        peak = _device_peak(stage._device)
        if peak is not None:
            stage.peak_device_bytes = max(stage.peak_device_bytes or 0, peak)


def _cuda_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` when it is a CUDA device that exists, else None."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class measure_stage:  # noqa: N801 (a context manager used like a function)
    """Measures the wall time and peak host and device memory of the ``with`` block.

    Example::

        with measure_stage("quantize", device="cuda") as cost:
            quantize_(model, config, stats=run)
        cost.wall_s, cost.peak_host_bytes, cost.peak_device_bytes

    Args:
        stage: the stage's name.
        device: where the stage's tensors live; the device peak is measured on a CUDA
            device only (None elsewhere).
    """

    def __init__(self, stage: str, device: torch.device | str | None = None):
        self.cost = StageCost(stage, _device=_cuda_device(device))

    def __enter__(self) -> StageCost:
        cost = self.cost
        _fold_peaks()
        if cost._device is not None:
            torch.cuda.synchronize(cost._device)
            torch.cuda.reset_peak_memory_stats(cost._device)
        if not _reset_host_peak():
            cost.host_scope = "process"
        _open.append(cost)
        cost._started = time.perf_counter()
        return cost

    def __exit__(self, *exc) -> None:
        cost = self.cost
        if cost._device is not None:
            torch.cuda.synchronize(cost._device)
        cost.wall_s = time.perf_counter() - cost._started
        _fold_peaks()
        _open.remove(cost)


def format_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def describe_stages(stages: list[dict]) -> str:
    """One line of stage costs (``StageCost.to_dict()`` each): "load 1.2 s (host 2.0 GiB),
    quantize 3.4 s (host 2.1 GiB, device 1.5 GiB)"."""
    parts = []
    for stage in stages:
        peaks = []
        if stage.get("peak_host_bytes") is not None:
            peaks.append(f"host {format_bytes(stage['peak_host_bytes'])}")
        if stage.get("peak_device_bytes") is not None:
            peaks.append(f"device {format_bytes(stage['peak_device_bytes'])}")
        peak = f" (peak {', '.join(peaks)})" if peaks else ""
        parts.append(f"{stage['stage']} {stage['wall_s']:.1f} s{peak}")
    return ", ".join(parts)
