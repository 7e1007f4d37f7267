"""Everything the commands write follows the user's umask (no private 0600 records)."""

import os
import stat

from qvd_bench.commands import main as cli

TINY = ["--num-prompts", "1", "--steps", "2", "--frames", "2", "--height", "8", "--width", "8"]


def test_every_file_and_folder_the_commands_write_follows_the_umask(tmp_path):
    umask = 0o027  # group may read, others nothing: neither the default nor private
    previous = os.umask(umask)
    try:
        job = ["run", "--model", "tiny-unet3d", "--methods", "fp,minmax", "--bits", "W8A8"]
        assert cli.main([*job, *TINY, "--no-progress", "--out", str(tmp_path / "job")]) == 0
        stats = tmp_path / "job" / "stats" / "tiny-unet3d-w0"
        record = ["quantize", "--stats", str(stats), "--method", "mse", "--bits", "W8A8"]
        assert cli.main([*record, "--out", str(tmp_path / "record")]) == 0
    finally:
        os.umask(previous)
    written = [p for p in tmp_path.rglob("*") if p != tmp_path]
    assert (tmp_path / "record" / "record.safetensors") in written
    assert (tmp_path / "job" / "reports" / "tiny-unet3d" / "index.html") in written
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in written}
    expected = {name: (0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask for name in modes}
    assert modes == expected
