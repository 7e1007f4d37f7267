"""Local weights files: clear errors, fingerprints, safe loading."""

from __future__ import annotations

import hashlib
import os
import pickle

import pytest
import torch

from qvd_bench.errors import UserError
from qvd_bench.evaluate.weights import (
    load_state_dict,
    load_torchscript,
    require_weights,
    sha256_of,
)

NAME, PUBLISHED = "detector.pt", "https://example.org/detector.pt (example/project)"


def test_require_weights_messages(tmp_path):
    with pytest.raises(UserError) as error:
        require_weights(tmp_path / "x.pt", name=NAME, published=PUBLISHED)
    assert str(error.value) == (
        f"{NAME} not found at {tmp_path / 'x.pt'}; download it from {PUBLISHED}"
    )
    with pytest.raises(UserError, match="no weights path given"):
        require_weights(None, name=NAME, published=PUBLISHED)
    (tmp_path / NAME).write_bytes(b"x")
    assert require_weights(tmp_path, name=NAME, published=PUBLISHED) == tmp_path / NAME


def test_sha256_is_cached_by_mtime_and_size(tmp_path):
    path = tmp_path / NAME
    path.write_bytes(b"first")
    assert sha256_of(path) == hashlib.sha256(b"first").hexdigest()
    path.write_bytes(b"second, longer")
    os.utime(path, ns=(1, 1))
    assert sha256_of(path) == hashlib.sha256(b"second, longer").hexdigest()


class NotAllowed:
    """A pickled object: weights_only loading must refuse it."""


def test_load_state_dict_accepts_tensors_only(tmp_path):
    path = tmp_path / NAME
    torch.save({"w": torch.ones(2)}, path)
    assert torch.equal(load_state_dict(path, name=NAME, published=PUBLISHED)["w"], torch.ones(2))
    torch.save({"w": NotAllowed()}, path)
    with pytest.raises(UserError, match=f"not a PyTorch state dict .*expected {NAME}"):
        load_state_dict(path, name=NAME, published=PUBLISHED)
    path.write_bytes(pickle.dumps(NotAllowed(), protocol=2))
    with pytest.raises(UserError, match="not a PyTorch state dict"):
        load_state_dict(path, name=NAME, published=PUBLISHED)
    torch.save(torch.ones(3), path)
    with pytest.raises(UserError, match="holds a Tensor, not a state dict"):
        load_state_dict(path, name=NAME, published=PUBLISHED)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:DeprecationWarning")
def test_load_torchscript(tmp_path):
    path = tmp_path / NAME
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    assert not load_torchscript(path, name=NAME, published=PUBLISHED).training
    with pytest.raises(UserError, match="is a TorchScript archive, not a PyTorch state dict"):
        load_state_dict(path, name=NAME, published=PUBLISHED)
    path.write_text("not an archive")
    with pytest.raises(UserError, match="not a TorchScript archive") as error:
        load_torchscript(path, name=NAME, published=PUBLISHED)
    assert "\n" not in str(error.value)
