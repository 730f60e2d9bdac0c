"""The streaming host pipeline: rows -> image work on a worker pool -> shape-sorted batches.

``RowStream`` walks the rows in windows of ``window`` consecutive rows. A window's images are
decoded, resized and patchified by a pool of worker threads while the previous window is
tokenised, sorted by shape (text-only first, then by patch count, then by length) and cut into
batches; a producer thread does this and hands the batches through a queue of ``prefetch``
batches, so the device runs one batch while the host prepares the next ones. Rows left over
after a window's full batches join the next window, so every batch but the last is full and a
corpus compiles the same handful of programs as one sorted over all its rows.

Memory: at most two windows of prepared rows plus ``prefetch`` batches live at once, whatever the
number of rows (the embeddings themselves, ``[N, D]`` float32, are the caller's).

Threads, not processes: the image work (PIL decode and resize, numpy normalise and patchify)
releases the GIL for most of its time, while a worker process must pickle every row's float32
patches back (4.8 MB per 448 x 448 image) and pay for its start. ``bench/bench_host.py`` on the
2-core development machine (448 x 448 JPEG rows, tiny model's tokenizer; the other ~1.8 cores busy
with other jobs, so the pool had little to spread over): 1 thread 22.9 rows/s, 2 threads 23.4,
2 processes 7.8.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from g2e_jax.data.rows import PreparedRow
from g2e_jax.preprocess import InputError, Preprocessor


def default_workers() -> int:
    """Image workers of the pool: one per core, at most 16."""
    return max(
        1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


_DONE = object()


class RowStream:
    """Iterates ``(positions, rows)`` batches of at most ``batch_size`` prepared rows.

    ``positions`` index ``texts`` (only the rows in ``indices`` are read: a process's share);
    ``errors="raise"`` raises the first bad row's ``InputError`` (in row order within a window),
    ``"collect"`` keeps going and records each bad row in ``self.bad`` ({position: InputError}).
    ``self.truncated`` lists the original lengths of rows truncated to ``max_len``.
    """

    def __init__(self, preprocessor: Preprocessor, texts: Sequence, images: Sequence, instructions: Sequence,
                 indices: Sequence[int], *, role: str, batch_size: int, window: int | None = None,
                 workers: int | None = None, prefetch: int = 4, errors: str = "raise"):  # fmt: skip
        if errors not in ("raise", "collect"):
            raise ValueError(f"errors must be 'raise' or 'collect', got {errors!r}")
        self.pre, self.texts, self.images, self.instructions = preprocessor, texts, images, instructions
        self.indices = list(indices)
        self.role, self.batch_size, self.errors = role, batch_size, errors
        self.window = max(batch_size, window or 8 * batch_size)
        self.workers = workers or default_workers()
        self.prefetch = prefetch
        self.bad: dict[int, InputError] = {}
        self.truncated: list[int] = []

    def __iter__(self):
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(out, stop), daemon=True, name="g2e-row-stream")
        thread.start()
        try:
            while True:
                item = out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    out.get_nowait()
                except queue.Empty:
                    thread.join(0.05)

    def _put(self, out: queue.Queue, stop: threading.Event, item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="g2e-image")
        try:
            system_len = len(self.pre.system_ids(self.role))
            windows = [self.indices[s : s + self.window] for s in range(0, len(self.indices), self.window)]
            carry: list[tuple[int, PreparedRow]] = []
            pending = self._submit(pool, windows[0]) if windows else None
            for w in range(len(windows)):
                current = pending
                # The next window's images are decoded while this one is tokenised and consumed.
                pending = self._submit(pool, windows[w + 1]) if w + 1 < len(windows) else None
                rows = carry + self._finish(windows[w], current, system_len)
                rows.sort(key=lambda r: shape_key(r[1]))
                full = len(rows) - len(rows) % self.batch_size
                for start in range(0, full, self.batch_size):
                    if not self._put(out, stop, _split(rows[start : start + self.batch_size])):
                        return
                carry = rows[full:]
                if stop.is_set():
                    return
            if carry and not self._put(out, stop, _split(carry)):
                return
            self._put(out, stop, _DONE)
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(out, stop, e)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, pool, window: list[int]) -> list:
        return [None if self.images[i] is None else pool.submit(self.pre.image_features, i, self.images[i])
                for i in window]  # fmt: skip

    def _finish(self, window: list[int], futures: list, system_len: int) -> list[tuple[int, PreparedRow]]:
        rows = []
        for i, future in zip(window, futures):
            try:
                features = None if future is None else future.result()
                row = self.pre._prepare_row(i, self.texts[i], self.images[i], self.role, self.instructions[i],
                                            system_len, features)  # fmt: skip
            except InputError as e:
                if self.errors == "raise":
                    raise
                self.bad[i] = e
                continue
            if row.truncated_from:
                self.truncated.append(row.truncated_from)
            rows.append((i, row))
        return rows


def shape_key(row: PreparedRow) -> tuple[int, int]:
    """Similar shapes together: text-only rows first, then by image size, then by length."""
    return (0 if row.patches is None else len(row.patches), len(row.user_ids))


def _split(pairs: list[tuple[int, PreparedRow]]) -> tuple[list[int], list[PreparedRow]]:
    return [i for i, _ in pairs], [r for _, r in pairs]
