"""Local weights files for the metric extractors: find, fingerprint and load them safely.

Weights are never downloaded here. Every extractor takes a local path (a file, or a
directory that holds the file under its published name); a missing or unreadable file is
a ``UserError`` that names the file, where it was looked for and where it is published.

Formats: state dicts are read with ``torch.load(weights_only=True)``, which refuses
pickled code. The StyleGAN-V FVD detector is published only as a TorchScript archive,
which is that protocol's own format; ``torch.jit.load`` runs TorchScript (a restricted
language with no access to Python), not pickled Python objects.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from qvd_bench.errors import UserError

# (resolved path, mtime_ns, size) -> hex digest; a rewritten file gets a new key.
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def require_weights(path: str | os.PathLike | None, *, name: str, published: str) -> Path:
    """Returns the weights file, or raises a UserError saying how to get it.

    Args:
        path: the file, or a directory holding a file called ``name``; None when the
            user gave nothing.
        name: the file's published name, e.g. ``"i3d_torchscript.pt"``.
        published: where the file is published (a URL and the project it belongs to).

    Returns:
        The path of an existing file.

    Raises:
        UserError: no path was given, or nothing exists there.
    """
    how = f"download it from {published}"
    if path is None:
        raise UserError(f"{name}: no weights path given; {how}")
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        candidate = candidate / name
    if not candidate.is_file():
        raise UserError(f"{name} not found at {candidate}; {how}")
    return candidate


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file, cached by (path, mtime, size).

    Args:
        path: an existing file.

    Returns:
        64 lowercase hex digits.
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    digest = _SHA256_CACHE.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(resolved, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = _SHA256_CACHE[key] = h.hexdigest()
    return digest


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder next to the data."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in f"/{name}" for name in archive.namelist())


def load_state_dict(path: Path, *, name: str, published: str) -> dict[str, Tensor]:
    """Reads a state dict with ``torch.load(weights_only=True)`` onto the CPU.

    Args:
        path: an existing file (see ``require_weights``).
        name, published: for the error message.

    Returns:
        parameter name -> tensor.

    Raises:
        UserError: the file is not a PyTorch state dict of tensors.
    """
    if _is_torchscript(path):
        # torch.load would hand a TorchScript archive to torch.jit.load.
        raise UserError(
            f"{path} is a TorchScript archive, not a PyTorch state dict; expected {name} as "
            f"published at {published}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any parse failure means "not this format"
        raise UserError(
            f"{path} is not a PyTorch state dict ({_first_line(e)}); expected {name} "
            f"as published at {published}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(
            f"{path} holds a {type(state).__name__}, not a state dict of tensors; expected "
            f"{name} as published at {published}"
        )
    return state


def load_torchscript(path: Path, *, name: str, published: str) -> torch.jit.ScriptModule:
    """Reads a TorchScript archive onto the CPU, in eval mode.

    Args:
        path: an existing file (see ``require_weights``).
        name, published: for the error message.

    Raises:
        UserError: the file is not a TorchScript archive.
    """
    try:
        with warnings.catch_warnings():
            # TorchScript is this detector's published format; the notice helps no user.
            warnings.filterwarnings("ignore", ".*torch.jit.load.*", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # any parse failure means "not this format"
        raise UserError(
            f"{path} is not a TorchScript archive ({_first_line(e)}); expected {name} "
            f"as published at {published}"
        ) from None
    return module.eval()
