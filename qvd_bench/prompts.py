"""Prompts for generation: a short built-in list, or a prompt file.

A prompt file has one prompt per line; blank lines and lines starting with ``#`` are
skipped, and surrounding whitespace is stripped.
"""

from __future__ import annotations

from pathlib import Path

from qvd_bench.errors import UserError

# Short, varied video captions in the style of MSR-VTT: people, animals, vehicles,
# nature, close-ups and camera motion.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a man is playing a guitar on a stage",
    "a dog runs across a grassy field chasing a ball",
    "waves crash against rocks on a beach at sunset",
    "a red car drives down a winding mountain road",
    "a woman is slicing vegetables in a kitchen",
    "a time-lapse of clouds moving over a city skyline",
    "a cat jumps onto a table and knocks over a cup",
    "a drone shot flying over a snowy forest",
)


def read_prompts(path: str | Path) -> list[str]:
    """Reads a prompt file.

    Args:
        path: a UTF-8 text file with one prompt per line.

    Returns:
        The prompts, in file order, stripped of surrounding whitespace.

    Raises:
        UserError: the file is missing or unreadable, or holds no prompt.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read prompt file {path}: {error}") from None
    prompts = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(line)
    if not prompts:
        raise UserError(
            f"prompt file {path} has no prompts (one per line; blank and # lines are skipped)"
        )
    return prompts


def select_prompts(path: str | Path | None, count: int | None) -> list[str]:
    """The first ``count`` prompts of a file, or of ``DEFAULT_PROMPTS`` without one.

    When the source has fewer than ``count`` prompts they are repeated in order, so that
    any number of samples can be generated (each sample still gets its own seed).

    Args:
        path: a prompt file, or None for the built-in prompts.
        count: how many prompts to return (>= 1); None for all of them.

    Returns:
        ``count`` prompts (all of the source when ``count`` is None).

    Raises:
        UserError: ``count`` < 1, or the file cannot be used (see ``read_prompts``).
    """
    if count is not None and count < 1:
        raise UserError(f"the number of prompts must be at least 1, got {count}")
    source = list(DEFAULT_PROMPTS) if path is None else read_prompts(path)
    if count is None:
        return source
    return [source[i % len(source)] for i in range(count)]
