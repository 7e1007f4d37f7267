"""Real-video reference sets for the Frechet metrics: check, load and identify them.

A reference directory holds ``videos.safetensors`` with one tensor ``videos``, uint8
(N, T, H, W, 3). Frechet rows name the set in their ``reference`` column
(``real:<directory name>/sha256:<16 hex digits of the file>``), and ``settings.json``
records the file, its full digest and the number and shape of the videos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qvd_bench.errors import UserError

REAL_VIDEOS_FILE = "videos.safetensors"
REAL_VIDEOS_KEY = "videos"


def check_real_videos(directory: str | Path) -> tuple[int, ...]:
    """Checks a real-video reference directory from the file header, without loading it.

    Args:
        directory: holds ``videos.safetensors`` with ``videos``, uint8 (N, T, H, W, 3).

    Returns:
        The shape (N, T, H, W, 3).

    Raises:
        UserError: one line, when the file is absent (an empty directory), unreadable, or
            holds no uint8 (N, T, H, W, 3) ``videos`` with N >= 1.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(directory) / REAL_VIDEOS_FILE
    if not path.is_file():
        raise UserError(
            f"the reference directory {directory} holds no {REAL_VIDEOS_FILE}: put the real videos there "
            f"as one tensor '{REAL_VIDEOS_KEY}', uint8 (N, T, H, W, 3)"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = sorted(handle.keys())
            if REAL_VIDEOS_KEY not in names:
                raise UserError(
                    f"{path} has no tensor '{REAL_VIDEOS_KEY}' (it has {', '.join(names) or 'none'})"
                )
            view = handle.get_slice(REAL_VIDEOS_KEY)
            shape, dtype = tuple(view.get_shape()), view.get_dtype()
    except (OSError, SafetensorError) as error:
        reason = " ".join(str(error).split())
        raise UserError(f"cannot read real videos from {path}: {reason}") from None
    if dtype != "U8" or len(shape) != 5 or shape[-1] != 3 or shape[0] < 1:
        raise UserError(
            f"{path}: '{REAL_VIDEOS_KEY}' must be uint8 (N, T, H, W, 3) with N >= 1, got "
            f"{dtype} {shape}"
        )
    return shape


def load_real_videos(directory: str | Path) -> torch.Tensor:
    """The real reference videos: uint8 (N, T, H, W, 3), ``videos`` in
    ``<dir>/videos.safetensors`` (checked by ``check_real_videos``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_real_videos(directory)
    path = Path(directory) / REAL_VIDEOS_FILE
    try:
        return load_file(str(path))[REAL_VIDEOS_KEY]
    except (OSError, SafetensorError) as error:
        reason = " ".join(str(error).split())
        raise UserError(f"cannot read real videos from {path}: {reason}") from None


def real_reference(directory: str | Path, videos: torch.Tensor) -> tuple[str, dict[str, Any]]:
    """The id of a real reference set for the ``reference`` column, and its record.

    The id names the directory and the file's content (``real:<name>/sha256:<16 hex>``),
    so numbers measured against different real sets are told apart wherever they go.

    Args:
        directory: the reference directory.
        videos: its videos, uint8 (N, T, H, W, 3).

    Returns:
        (id, JSON-safe record: directory, file, sha256, videos, shape).
    """
    from qvd_bench.evaluate.weights import sha256_of

    path = Path(directory).resolve() / REAL_VIDEOS_FILE
    digest = sha256_of(path)
    record = {
        "kind": "real",
        "directory": str(path.parent),
        "file": REAL_VIDEOS_FILE,
        "sha256": digest,
        "videos": int(videos.shape[0]),
        "shape": [int(n) for n in videos.shape],
    }
    return f"real:{path.parent.name}/sha256:{digest[:16]}", record
