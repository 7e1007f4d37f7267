"""Every Python snippet in the README runs as written.

Each ```python block runs in a fresh namespace, in a directory that holds what the README
assumes its reader has made: ``stats/tiny-unet3d-w0`` (a small collection).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qvd_bench.collect.collector import collect
from qvd_bench.config import CollectConfig

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_python_snippets():
    assert len(BLOCKS) >= 2


@pytest.fixture(scope="module")
def reader_directory(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    config = CollectConfig(
        model="tiny-unet3d",
        prompts=("a cat",),
        steps=2,
        guidance_scale=1.0,
        frames=2,
        height=8,
        width=8,
        temporal_stride=20,
        reservoir_capacity=64,
    )
    collect(config, root / "stats" / "tiny-unet3d-w0", progress=False)
    return root


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, reader_directory, monkeypatch):
    monkeypatch.chdir(reader_directory)
    code = compile(BLOCKS[index], f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": f"readme_block_{index + 1}"})
