"""What keeps a long run honest: a workdir preflight, the non-finite step counter, bad-row records.

``train_step`` itself refuses a non-finite update (see ``g2e_jax.train.step``); ``BadSteps`` counts
those steps on the host one step late (reading step s's flag after step s + 1 is dispatched keeps the
host's batch building overlapped with the device) and says when ``train.max_bad_steps`` came in a
row. ``preflight_workdir`` fails before the first step when the workdir cannot take a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np


class TrainingStopped(ValueError):
    """The run stopped on purpose (too many non-finite steps); the message says why and what was saved."""


def checkpoint_bytes(*trees) -> int:
    """Bytes of one checkpoint: every array of the trees at its global size."""
    return int(
        sum(
            np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
            for x in jax.tree.leaves(trees)
            if hasattr(x, "shape")
        )
    )


def preflight_workdir(workdir: Path, need_bytes: int = 0) -> None:
    """OSError now, before any step, if ``workdir`` cannot be created or written, or holds less free
    space than ``need_bytes`` (one checkpoint, plus a little for the logs)."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"workdir {workdir} is not writable: {e.strerror or e}") from None
    free = shutil.disk_usage(workdir).free
    need = need_bytes + (64 << 20)
    if free < need:
        raise OSError(
            f"workdir {workdir}: {free / 2**30:.2f} GiB free, but a checkpoint needs about "
            f"{need / 2**30:.2f} GiB (trainable parameters + optimizer state); free some space "
            "or choose another --workdir"
        )


class BadSteps:
    """Counts non-finite steps from the step's ``finite`` flag, one step late (see the module doc)."""

    def __init__(self, max_in_row: int, total: int = 0, log=print):
        self.max_in_row = max_in_row
        self.total = total  # over the whole run (restored from the checkpoint on resume)
        self.in_row = 0
        self.streak = 0  # the run of non-finite steps that tripped the guard
        self.tripped = False  # ``max_in_row`` non-finite steps came in a row: the run must stop
        self.last_good: int | None = None  # the last finite step (count of steps done)
        self._pending = None
        self._log = log

    def _resolve(self, done: int, metrics) -> None:
        if int(metrics["finite"]):
            self.in_row, self.last_good = 0, done
            return
        self.total += 1
        self.in_row += 1
        self._log(
            f"step {done}: non-finite step (loss {float(metrics['loss'])}, grad norm "
            f"{float(metrics['grad_norm'])}); parameters and optimizer state left unchanged "
            f"({self.in_row} in a row, train.max_bad_steps={self.max_in_row})"
        )
        if self.max_in_row and self.in_row >= self.max_in_row and not self.tripped:
            self.tripped, self.streak = True, self.in_row

    def flush(self) -> None:
        """Resolves the step still pending (waits for it)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._resolve(*pending)

    def observe(self, done: int, metrics) -> None:
        """Takes step ``done``'s metrics (not read yet) and resolves the step before; once tripped, the
        step just dispatched is resolved too, so that the state a stop saves is known."""
        previous, self._pending = self._pending, (done, metrics)
        if previous is not None:
            self._resolve(*previous)
        if self.tripped:
            self.flush()

    def message(self, done: int, workdir: Path) -> str:
        good = "the initial state" if self.last_good is None else f"the state after step {self.last_good}"
        return (
            f"stopping at step {done}: {self.streak} non-finite steps in a row (train.max_bad_steps="
            f"{self.max_in_row}). Saved a checkpoint at step {done} holding {good}, the last finite step "
            f"(non-finite steps change nothing), in {workdir / 'checkpoints'}. Lower train.learning_rate "
            "or check the data, then re-run the same command to resume past these batches."
        )


def skipped_file(workdir: Path) -> Path:
    """``skipped.jsonl`` for process 0; other processes write their own (no two writers per file)."""
    me = jax.process_index()
    return workdir / ("skipped.jsonl" if me == 0 else f"skipped.process{me}.jsonl")


def record_skipped(path: Path, records: list[dict]) -> None:
    if records:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
