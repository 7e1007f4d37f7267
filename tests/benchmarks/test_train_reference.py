"""The reference model's training script: a few steps run, and a resumed run is the
uninterrupted one, bit for bit."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_reference.py"
SMALL = ["--batch", "2", "--dim", "16", "--heads", "2", "--layers", "1", "--text-dim", "8"]
SMALL += ["--text-layers", "1", "--eval-every", "0", "--log-every", "1", "--warmup", "2"]


def load_script():
    spec = importlib.util.spec_from_file_location("train_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resuming_gives_the_uninterrupted_run(tmp_path):
    train = load_script()
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train.main(["--out", str(whole), "--steps", "4", "--checkpoint-every", "4", *SMALL]) == 0
    assert train.main(["--out", str(split), "--steps", "2", "--checkpoint-every", "2", *SMALL]) == 0
    first = torch.load(split / "checkpoint.pt", weights_only=True)
    assert first["step"] == 2
    resumed = ["--out", str(split), "--steps", "4", "--checkpoint-every", "2", "--resume"]
    assert train.main([*resumed, *SMALL]) == 0

    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    # Training moved the weights away from the resumption point.
    assert not all(torch.equal(first["model"][n], b["model"][n]) for n in b["model"])
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)
    # The log is the uninterrupted run's: one loss record per step, steps 1..4.
    steps = [line for line in (split / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 4
    assert (split / "pipeline" / "transformer").is_dir()


def test_export_writes_the_ema_weights_shapes_wan_loads(tmp_path, capsys):
    from qvd_bench.models import shapes_wan

    train = load_script()
    out = tmp_path / "run"
    assert train.main(["--out", str(out), "--steps", "2", "--checkpoint-every", "2", *SMALL]) == 0
    capsys.readouterr()
    assert train.main(["--out", str(out), "--export", str(tmp_path / "weights"), *SMALL]) == 0
    printed = capsys.readouterr().out
    hashes = json.loads(printed[printed.index("{") :])["sha256"]
    loaded = shapes_wan.load_shapes_wan(folder=tmp_path / "weights", hashes=hashes)
    ema = torch.load(out / "checkpoint.pt", weights_only=True)["ema"]
    state = loaded.denoiser.state_dict()
    assert all(torch.equal(ema[k], state[k]) for k in ema)
    assert loaded.pipeline.scheduler.config.shift == 3.0
