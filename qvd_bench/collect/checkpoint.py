"""When a collection run checkpoints, and what an interruption saves.

A checkpoint holds the accumulators' states after a finished sample; writing one takes
time, so it is written at most every ``every`` seconds. The states after the latest
finished sample are copied every time, though, so that a Ctrl-C between two writes saves
what is finished: the samples finished since the last write are not lost, and the
interrupted sample's part-accumulated statistics are not saved.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from qvd_bench import store
from qvd_bench.errors import Interrupted


class CollectCheckpoints:
    """The checkpoints of one collection run (of one process).

    The copy of the latest states costs as much memory as a checkpoint, which a write
    takes anyway while it runs.

    Args:
        run_dir: the run being collected (checkpoints go to ``<run>.partial/``).
        fingerprint: what must match for a rerun to resume (``store.save_checkpoint``).
        every: seconds between checkpoint writes; 0 writes after every sample.
        groups: returns group name -> {key: accumulator}, the states to save, when the
            statistics of the finished samples are complete (pending merges folded in).
        saved: ids of the samples in the checkpoint on disk (resumed from), if any.
    """

    def __init__(
        self,
        run_dir: Path,
        fingerprint: dict[str, Any],
        every: float,
        groups: Callable[[], dict[str, dict]],
        saved: Iterable[int] = (),
    ):
        self.run_dir = Path(run_dir)
        self.fingerprint = fingerprint
        self.every = every
        self.groups = groups
        self.saved = sorted(saved)
        self._latest: tuple[list[int], store.CheckpointState] | None = None
        self._last_write = time.monotonic()

    def finished(self, done: Iterable[int]) -> None:
        """Takes the states after a finished sample, and writes them when it is time.

        Args:
            done: ids of every finished sample, this one included.
        """
        self._latest = (sorted(done), store.checkpoint_state(self.groups()))
        if time.monotonic() - self._last_write >= self.every:
            self._write()

    def interrupted(self, samples: int) -> Interrupted:
        """Saves the states of the latest finished sample unless they are saved already.

        Args:
            samples: how many samples this process collects in all.

        Returns:
            The ``Interrupted`` to raise; its message says what was saved and what a rerun
            resumes.
        """
        if self._latest is not None and self._latest[0] != self.saved:
            self._write()
        if not self.saved:
            return Interrupted(
                "no prompt had finished, so nothing was saved; "
                "rerunning the same command starts from the beginning"
            )
        remaining = samples - len(self.saved)
        return Interrupted(
            f"the statistics of {len(self.saved)} of {samples} prompts are saved in "
            f"{store.partial_dir(self.run_dir)}; rerunning the same command resumes with "
            + (f"the other {remaining}" if remaining else "writing the run")
        )

    def _write(self) -> None:
        assert self._latest is not None
        done, state = self._latest
        store.save_checkpoint(self.run_dir, self.fingerprint, done, state)
        self.saved = done
        self._last_write = time.monotonic()
