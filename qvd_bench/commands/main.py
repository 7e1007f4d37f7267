"""The ``qvd-bench`` command line.

Bad input (``UserError``, argument errors) prints one line on stderr and exits with
code 2; an interrupted run says how to resume and exits with 130; output piped into a
reader that stops early (``qvd-bench models | head -1``) ends quietly with 141, as a
process killed by SIGPIPE does.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from importlib import metadata

from qvd_bench.commands import (
    analyze,
    collect,
    evaluate,
    info,
    models,
    perf,
    quantize,
    regress,
    report,
    run,
    sensitivity,
)
from qvd_bench.commands._args import Parser, with_flags
from qvd_bench.errors import UserError

# The subcommands in the order ``--help`` lists them; each module has
# ``add_parser(subparsers)`` and ``run(args) -> int``.
COMMANDS = {
    "models": models,
    "collect": collect,
    "analyze": analyze,
    "quantize": quantize,
    "sensitivity": sensitivity,
    "evaluate": evaluate,
    "run": run,
    "regress": regress,
    "report": report,
    "info": info,
    "perf": perf,
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qvd-bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {metadata.version('qvd-bench')}"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    subparsers.required = True
    for module in COMMANDS.values():
        module.add_parser(subparsers)
    return parser


# The libraries whose advice-level warnings are kept out of our output, and the environment
# variable each reads its verbosity from when it is imported.
QUIET_LIBRARIES = {"diffusers": "DIFFUSERS_VERBOSITY", "transformers": "TRANSFORMERS_VERBOSITY"}


def _quiet_libraries() -> None:
    """Keeps diffusers' and transformers' advice-level warnings out of our output.

    Through their verbosity variables (unless the user set them), so that neither is
    imported before a command needs it: importing them takes seconds, which ``--help``
    and a one-line error on bad input need not wait for, and the main job never needs
    transformers. A library already imported is set directly.
    """
    for library, variable in QUIET_LIBRARIES.items():
        level = os.environ.setdefault(variable, "error")
        if library in sys.modules:
            logging_module = importlib.import_module(f"{library}.utils.logging")
            logging_module.set_verbosity(logging_module.log_levels.get(level, logging.ERROR))


# glibc's mallopt parameters (malloc.h) and the values ``tune_allocator`` sets: blocks up
# to 32 MiB (glibc's largest mmap threshold) come from the heap, and up to 1 GiB of freed
# heap stays mapped for the next allocations.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 2**30
MALLOC_ENV = "QVD_BENCH_MALLOC"


def tune_allocator() -> bool:
    """Lets glibc's malloc reuse freed memory instead of returning it to the system.

    torch's CPU allocator takes every tensor from malloc and frees it when it dies. With
    glibc's defaults the memory of a forward's activations goes back to the system and
    comes back as fresh pages on the next forward, each page a fault served by the
    kernel. Keeping the freed heap removes those faults; the cost is that the process
    keeps its peak memory until it exits, which suits a command-line run
    (``qvd-bench perf`` measures the difference).

    Only glibc (Linux) is tuned; ``QVD_BENCH_MALLOC=default`` keeps its defaults.

    Returns:
        True when the settings were applied.
    """
    if os.environ.get(MALLOC_ENV) == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


# 128 + SIGPIPE: what a shell reports for a writer whose reader closed the pipe.
BROKEN_PIPE_EXIT = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qvd-bench``; returns the exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tune_allocator()
    try:
        _quiet_libraries()
        args = build_parser().parse_args(argv)
        code = COMMANDS[args.command].run(args)
        # Output to a pipe is block-buffered: a reader that has gone shows here, not in
        # the interpreter's flush at exit (which could only print "Exception ignored").
        sys.stdout.flush()
        return code
    except UserError as error:
        print(f"qvd-bench: error: {with_flags(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        # An ``Interrupted`` (collect, evaluate) says what was saved and what resumes.
        detail = with_flags(str(interrupt)) or "rerun the same command to resume"
        print(f"qvd-bench: interrupted; {detail}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away: nothing more can be shown, and the interpreter's last
        # flush of stdout at exit must not fail again (it would print a traceback).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE_EXIT
