"""What the commands write to the terminal: a reader that stops early, the job's progress."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qvd_bench.commands._args import working
from qvd_bench.commands.main import BROKEN_PIPE_EXIT
from qvd_bench.commands.run import run_job
from qvd_bench.errors import UserError
from qvd_bench.evaluate.progress import COLLECT_STEP_COST, QUANTIZE_COST, REPORT_COST

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


def _bar_counts(stderr: str) -> list[tuple[int, int, str]]:
    """Every (n, total, remaining time) the job's progress bar showed, in order."""
    found = re.findall(r"qvd-bench run:.*?(\d+)/(\d+) \[[^<]*<([^,]*),", stderr)
    return [(int(n), int(t), eta) for n, t, eta in found]


def test_one_progress_bar_with_its_total_known_before_the_first_step(tmp_path, capsys):
    prompts, steps, methods, bits = 1, 2, ["fp", "minmax", "mse"], ["W8A8"]
    # Collection and the FP reference sample each prompt once; every quantized method
    # (fp reuses the reference's videos) makes a teacher-forced and a free-running video.
    quantized = [m for m in methods if m != "fp"]
    expected = prompts * steps * (1 + 1 + 2 * len(quantized) * len(bits))
    # The bar's units: a sampling step is one, the other stages weigh their estimated cost.
    units = {
        "statistics": prompts * steps * COLLECT_STEP_COST,
        "fp reference": prompts * steps,
        "quantize": len(quantized) * len(bits) * QUANTIZE_COST,
        "quantized": 2 * len(quantized) * len(bits) * prompts * steps,
        "report": REPORT_COST,
    }
    total = sum(units.values())
    run_job(tmp_path, model="tiny-unet3d", num_prompts=prompts, frames=2, steps=steps,
            methods=methods, bits=bits)  # fmt: skip
    printed = capsys.readouterr()
    assert f"work: {expected} sampling steps" in printed.out
    shown = ", ".join(f"{stage} {count}" for stage, count in units.items())
    assert f"the progress bar counts {total} units of one sampling step's time ({shown})" in (
        printed.out
    )
    counts = _bar_counts(printed.err)
    # The total is shown before any work, with a finite ETA (the machine probe's estimate).
    assert counts[0][:2] == (0, total) and re.fullmatch(r"\d\d:\d\d", counts[0][2])
    assert {t for _, t, _ in counts} == {total}
    assert counts[-1][:2] == (total, total)  # and it ends exactly at its total
    videos = prompts * (1 + 2 * len(quantized) * len(bits))
    assert f"sampling steps: {expected} for {videos} videos" in printed.out
    assert f"the progress bar's count: {total} units" in printed.out
    record = json.loads((tmp_path / "results" / "tiny-unet3d" / "run.json").read_text())
    assert record["planned_work"] == units

    # A rerun collects nothing and takes every video from the cache: its total says so.
    run_job(tmp_path, model="tiny-unet3d", num_prompts=prompts, frames=2, steps=steps,
            methods=methods, bits=bits)  # fmt: skip
    printed = capsys.readouterr()
    rerun_steps = expected - prompts * steps
    assert f"work: {rerun_steps} sampling steps (statistics 0," in printed.out
    rerun = total - units["statistics"]
    counts = _bar_counts(printed.err)
    assert counts[0][:2] == (0, rerun) and counts[-1][:2] == (rerun, rerun)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_line_on_a_terminal_is_cleared_before_an_error(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with working("measuring"):
        pass
    assert terminal.getvalue().startswith("qvd-bench: measuring …\r\x1b[K")
    assert re.search(r"qvd-bench: measuring: done in \d+\.\d s\n$", terminal.getvalue())

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with pytest.raises(UserError), working("measuring"):
        raise UserError("bad")
    # Cleared, and no "done": the error that follows is the only line.
    assert terminal.getvalue() == "qvd-bench: measuring …\r\x1b[K"
