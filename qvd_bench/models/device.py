"""Device and dtype of a model, checked before any work: the device must exist on this
machine and the dtype must have kernels there for the operations the denoisers use.

A CUDA device asked for on a machine without CUDA, or half precision on a device whose
PyTorch build lacks one of those kernels, is a ``UserError`` naming what is missing,
raised before a model is built or a sample drawn (``check_device``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from qvd_bench.config import DTYPES
from qvd_bench.errors import UserError

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; a floating torch dtype passes through.

    Names are those of ``DTYPES`` (what commands and stored configs take); library callers
    may pass any floating torch dtype, e.g. float64 for an exact reference.

    Raises:
        UserError: a name outside ``DTYPES``, or a dtype that is not floating point.
    """
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in TORCH_DTYPES:
        return TORCH_DTYPES[dtype]
    raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def check_device(
    device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"
) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype, once checked that models can run there.

    Args:
        device: a torch device ("cpu", "cuda", "cuda:1", "mps").
        dtype: one of ``DTYPES`` (a name or the torch dtype).

    Returns:
        (torch.device, torch.dtype).

    Raises:
        UserError: an unparsable device, a device this machine lacks, or a dtype one of
            the denoisers' operations has no kernel for on that device.
    """
    dtype = torch_dtype(dtype)
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(
            f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
        ) from None
    _check_available(parsed)
    missing = _missing_kernel(parsed, dtype)
    if missing is not None:
        name = str(dtype).removeprefix("torch.")
        raise UserError(
            f"dtype {name} cannot run on device {parsed}: this PyTorch build has no "
            f"{name} kernel for {missing} there; use another dtype or device"
        )
    return parsed, dtype


def _check_available(device: torch.device) -> None:
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device} asked for, but CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"device {device} asked for, but this machine has {count} CUDA devices")
        return
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"device {device} asked for, but MPS is not available on this machine")
        return
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"device {device} is not usable on this machine: {reason}") from None


# The operations the denoisers, the samplers and fake quantization run, each on a tiny
# input: (name, function of (device, dtype)).
_PROBES = (
    (
        "linear",
        lambda d, t: F.linear(
            torch.ones(2, 4, device=d, dtype=t), torch.ones(3, 4, device=d, dtype=t)
        ),
    ),
    (
        "conv2d",
        lambda d, t: F.conv2d(
            torch.ones(1, 2, 4, 4, device=d, dtype=t),
            torch.ones(2, 2, 3, 3, device=d, dtype=t),
            padding=1,
        ),
    ),
    (
        "conv3d",
        lambda d, t: F.conv3d(
            torch.ones(1, 2, 2, 4, 4, device=d, dtype=t),
            torch.ones(2, 2, 1, 3, 3, device=d, dtype=t),
            padding=(0, 1, 1),
        ),
    ),
    (
        "group_norm",
        lambda d, t: F.group_norm(
            torch.ones(1, 4, 2, 2, device=d, dtype=t),
            2,
            torch.ones(4, device=d, dtype=t),
            torch.zeros(4, device=d, dtype=t),
        ),
    ),
    (
        "layer_norm",
        lambda d, t: F.layer_norm(
            torch.ones(2, 4, device=d, dtype=t),
            (4,),
            torch.ones(4, device=d, dtype=t),
            torch.zeros(4, device=d, dtype=t),
        ),
    ),
    (
        "rms_norm",
        lambda d, t: F.rms_norm(
            torch.ones(2, 4, device=d, dtype=t), (4,), torch.ones(4, device=d, dtype=t)
        ),
    ),
    ("softmax", lambda d, t: torch.ones(2, 4, device=d, dtype=t).softmax(-1)),
    ("silu", lambda d, t: F.silu(torch.ones(4, device=d, dtype=t))),
    ("gelu", lambda d, t: F.gelu(torch.ones(4, device=d, dtype=t), approximate="tanh")),
    (
        "scaled_dot_product_attention",
        lambda d, t: F.scaled_dot_product_attention(
            *(torch.ones(1, 2, 3, 4, device=d, dtype=t),) * 3
        ),
    ),
    (
        "interpolate",
        lambda d, t: F.interpolate(
            torch.ones(1, 2, 2, 2, device=d, dtype=t), scale_factor=2.0, mode="nearest"
        ),
    ),
    ("randn", lambda d, t: torch.randn(4, device=d, dtype=t)),
    ("round", lambda d, t: torch.ones(4, device=d, dtype=t).mul(0.3).round().clamp(-1, 1)),
    ("cos", lambda d, t: torch.ones(4, device=d, dtype=t).cos().exp()),
)


@functools.cache
def _missing_kernel(device: torch.device, dtype: torch.dtype) -> str | None:
    """The first operation of ``_PROBES`` without a kernel, or None."""
    for name, probe in _PROBES:
        try:
            probe(device, dtype)
        except (RuntimeError, NotImplementedError) as error:
            if "not implemented" in str(error) or isinstance(error, NotImplementedError):
                return name
            raise
    return None
