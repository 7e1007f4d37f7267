"""Real-video reference sets: a bad directory is refused in one line before anything runs."""

import re

import pytest
import torch
from safetensors.torch import save_file

from qvd_bench.commands.main import main


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "holds no videos.safetensors"),
        (b"<html>not found</html>", "cannot read real videos"),
        ({"clips": torch.zeros(1, 2, 4, 4, 3, dtype=torch.uint8)}, "has no tensor 'videos'"),
        ({"videos": torch.zeros(1, 2, 4, 4, 3)}, r"must be uint8 \(N, T, H, W, 3\)"),
        ({"videos": torch.zeros(0, 2, 4, 4, 3, dtype=torch.uint8)}, "N >= 1"),
    ],
    ids=["empty", "unreadable", "no-videos-tensor", "float", "no-videos"],
)
def test_bad_reference_directory_exits_2_with_one_line(tmp_path, capsys, content, message):
    directory = tmp_path / "real"
    directory.mkdir()
    if isinstance(content, bytes):
        (directory / "videos.safetensors").write_bytes(content)
    elif content is not None:
        save_file(content, str(directory / "videos.safetensors"))
    out = tmp_path / "out"
    code = main(["evaluate", "--reference", str(directory), "--out", str(out), "--no-progress"])
    assert code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and re.search(message, error), error
    assert not out.exists()  # refused before anything ran
