"""Argument helpers shared by the subcommands: the parser class, model and sampling
arguments, comma-separated lists."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from qvd_bench.errors import UserError

# Library texts name parameters; printed by a command they name the flags that set them.
PARAMETER_FLAGS = {
    "temporal_stride": "--temporal-stride",
    "timestep_groups": "--timestep-groups",
    "weights['fvd']": "--fvd-weights",
    "weights['fvd-cd']": "--fvd-cd-weights",
    "weights['fid']": "--fid-weights",
    "weights['clipsim']": "--clip-model",
}
_PARAMETER = re.compile("|".join(rf"(?<![\w-]){re.escape(name)}(?!\w)" for name in PARAMETER_FLAGS))


def with_flags(text: str) -> str:
    """A library text for the terminal: the parameters of ``PARAMETER_FLAGS`` replaced by
    their flags (``temporal_stride`` -> ``--temporal-stride``)."""
    return _PARAMETER.sub(lambda match: PARAMETER_FLAGS[match.group(0)], text)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


# The folders an output root holds.
ROOT_FOLDERS = ("stats", "results", "reports")


def output_root(out: str) -> Path:
    """The output root an ``--out`` names.

    ``--out results`` names the results folder of the root ``.``: taken as a root of its
    own it would give ``results/results/MODEL``. Such a path is replaced by its parent,
    with a note that says so.
    """
    path = Path(out)
    if path.name not in ROOT_FOLDERS:
        return path
    root = path.parent
    print(
        f"note: --out {out} names a {path.name}/ folder of an output root; writing under "
        f"{root}/ ({root / 'results'}/, {root / 'reports'}/, {root / 'stats'}/)",
        file=sys.stderr,
    )
    return root


def csv(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def int_list(values: Sequence[str], flag: str) -> tuple[int, ...]:
    """The integers of a comma-separated option, or a UserError naming ``flag``."""
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise UserError(
            f"{flag} takes comma-separated integers, got {','.join(values)!r}"
        ) from None


def add_model_args(parser: argparse.ArgumentParser, **device_options: Any) -> None:
    """``--model``, the preset's weight seed and knobs, and ``add_device_args``' flags
    (``device_options`` go to it)."""
    parser.add_argument(
        "--model",
        default="tiny-unet3d",
        help="zoo name, local pipeline directory or hub id (default: tiny-unet3d)",
    )
    parser.add_argument(
        "--weight-seed",
        type=int,
        default=0,
        help="seed of the random weights of zoo presets (default: 0)",
    )
    parser.add_argument(
        "--disparity",
        type=float,
        default=None,
        help="log-normal sigma of injected per-channel gains (preset default)",
    )
    parser.add_argument(
        "--asymmetry",
        type=float,
        default=None,
        help="scale of injected per-channel offsets (preset default)",
    )
    add_device_args(parser, **device_options)


def add_device_args(
    parser: argparse.ArgumentParser, *, dtype_default: str | None = "float32", dtype_help: str = ""
) -> None:
    """``--device`` and ``--dtype``, checked by ``device_and_dtype`` before any work.

    Args:
        parser: the subcommand's parser.
        dtype_default: the default dtype; None leaves it to the command (``dtype_help``
            says what it takes then).
        dtype_help: the help text's default when ``dtype_default`` is None.
    """
    from qvd_bench.config import DTYPES

    parser.add_argument(
        "--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: cpu)"
    )
    parser.add_argument(
        "--dtype",
        default=dtype_default,
        choices=DTYPES,
        help=f"model dtype (default: {dtype_help or dtype_default})",
    )


def device_and_dtype(args: argparse.Namespace) -> tuple[str, str | None]:
    """The ``--device`` and ``--dtype`` of ``add_device_args``, checked: a device this
    machine lacks or a dtype without kernels there is a one-line error before any work."""
    from qvd_bench.models.device import check_device

    check_device(args.device, args.dtype or "float32")
    return args.device, args.dtype


def add_sampling_args(parser: argparse.ArgumentParser, *, steps: int) -> None:
    """Prompts and sampling settings, shared by collect and evaluate."""
    parser.add_argument(
        "--prompts", metavar="FILE", help="prompt file, one per line (default: built-in prompts)"
    )
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="use the first N prompts (default: all of the file, 2 built-in)",
    )
    parser.add_argument(
        "--steps", type=int, default=steps, help=f"sampling steps (default: {steps})"
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=7.5,
        help="classifier-free guidance scale; <= 1 disables CFG (default: 7.5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--frames", type=int, default=8, help="latent frames (default: 8)")
    parser.add_argument("--height", type=int, default=16, help="latent height (default: 16)")
    parser.add_argument("--width", type=int, default=16, help="latent width (default: 16)")


def selected_prompts(args: argparse.Namespace) -> tuple[str, ...]:
    """The prompts ``add_sampling_args``' flags select: the first ``--num-prompts`` of the
    ``--prompts`` file (all of it by default), or of the built-in prompts (2 by default)."""
    from qvd_bench.prompts import select_prompts

    count = args.num_prompts if args.num_prompts is not None else (None if args.prompts else 2)
    return tuple(select_prompts(args.prompts, count))


def sampling_values(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling settings of ``add_sampling_args``' flags, by parameter name."""
    return {
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "frames": args.frames,
        "height": args.height,
        "width": args.width,
    }


def command_flags(add_parser: Callable[[Any], None]) -> dict[str, str]:
    """The options a subcommand declares, as argument name -> flag (``num_prompts`` ->
    ``--num-prompts``), read from its ``add_parser`` (the one place they are declared)."""
    subparsers = argparse.ArgumentParser().add_subparsers()
    add_parser(subparsers)
    (parser,) = subparsers.choices.values()
    return {
        action.dest: action.option_strings[0]
        for action in parser._actions
        if action.option_strings and action.dest != "help"
    }


@contextlib.contextmanager
def working(what: str) -> Iterator[None]:
    """A status line on a terminal's stderr while a step that prints nothing works.

    "qvd-bench: <what> …" stays on screen while it works and is cleared when it ends, so
    that an error that ends it is still one line; "qvd-bench: <what>: done in N s" follows
    a success. Nothing is written when stderr is not a terminal (logs, pipes, tests).
    """
    shown = sys.stderr.isatty()
    if shown:
        sys.stderr.write(f"qvd-bench: {what} …")
        sys.stderr.flush()
    started = time.perf_counter()
    try:
        yield
    finally:
        if shown:
            sys.stderr.write("\r\033[K")  # back to the line's start, and clear it
            sys.stderr.flush()
    if shown:
        elapsed = time.perf_counter() - started
        print(f"qvd-bench: {what}: done in {elapsed:.1f} s", file=sys.stderr, flush=True)
