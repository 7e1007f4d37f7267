"""What the commands write to the terminal: a reader that stops early, the job's progress."""

import os
import subprocess
import sys
from pathlib import Path

from qvd_bench.commands.main import BROKEN_PIPE_EXIT

ROOT = Path(__file__).resolve().parents[2]


def test_output_into_a_closed_pipe_ends_quietly():
    """``qvd-bench models | head -0``: the reader is gone before the first line."""
    read, write = os.pipe()
    os.close(read)  # every write now fails with EPIPE, as after ``head`` has exited
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "qvd_bench", "models"],
            stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write)
    assert done.stderr == ""
    assert done.returncode == BROKEN_PIPE_EXIT
