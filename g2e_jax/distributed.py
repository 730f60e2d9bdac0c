"""Multi-host jobs: JAX's distributed runtime, each process's share of the rows, and gathers.

Every job that encodes (``train``'s eval, ``eval``, ``mine``, ``embed``) runs the same program on
every process: each prepares only its share of the rows (``share``), the device batches are built
from every process's part, and the results are gathered so that every process holds them; only
process 0 (``is_lead``) writes files. With one process every helper is a no-op.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

import jax
import numpy as np


def init_distributed(cfg) -> None:
    """``jax.distributed.initialize``: explicit coordinator, or JAX's own detection on TPU / SLURM;
    timeouts from ``cfg.distributed`` (``config_sections.distributed_section``), and a ``Watchdog`` that names a lost process (one helper for
    every multi-process command)."""
    d = cfg.get("distributed")
    if d is None or jax.distributed.is_initialized():
        return
    timeout = int(d.get("heartbeat_timeout_s", 100))
    timeouts = {
        # JAX aborts every process (C++, without naming the lost one in words) when its heartbeat times
        # out. Its clients beat every half timeout, so its service may call a process dead after half
        # of it: 4x ours puts that (2x) after the watchdog's latest word (1.25x), a backstop.
        "heartbeat_timeout_seconds": 4 * timeout,
        "initialization_timeout": int(d.get("initialization_timeout_s", 300)),
    }
    if d.coordinator is not None:
        jax.distributed.initialize(d.coordinator, d.num_processes, d.process_id, **timeouts)
    elif (
        ("SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1)
        or os.environ.get("TPU_WORKER_HOSTNAMES")
        or os.environ.get("CLOUD_TPU_TASK_ID")
    ):
        jax.distributed.initialize(**timeouts)
    else:
        return
    if jax.process_count() > 1:
        global _watchdog
        client = coordination_client()
        _watchdog = Watchdog(client, jax.process_index(), jax.process_count(), timeout)
        _watchdog.start()
    print(
        f"distributed: process {jax.process_index()} of {jax.process_count()} (JAX 'task "
        f"{jax.process_index()}') on {socket.gethostname()}, pid {os.getpid()}; a process silent for "
        f"{timeout} s stops the others",
        flush=True,
    )


def coordination_client():
    """The coordination service's client (its key-value store) of a multi-process run.

    JAX exposes the store only through ``jax._src.distributed`` (no public API as of 0.10): this is
    the package's one private import, kept here so that a JAX change breaks one place."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def publish(key: str, value: str) -> None:
    """Sets ``key`` in the coordination store, for the other processes to read with ``wait_for``."""
    coordination_client().key_value_set(f"g2e_jax/{key}", value)


def wait_for(key: str, timeout_s: float = 7 * 24 * 3600) -> str:
    """The value another process ``publish``-ed under ``key``, waiting for it up to ``timeout_s``
    (no collective: a long first step on one process cannot time it out)."""
    return coordination_client().blocking_key_value_get(f"g2e_jax/{key}", int(timeout_s * 1000))


def wait_for_lost_process(error: BaseException) -> None:
    """After a collective failed in a multi-process run, gives the ``Watchdog`` the time to name a lost
    process (it then ends this process); returns when none was lost, for the caller to re-raise."""
    text = str(error)
    if _watchdog is None or not (
        isinstance(error, jax.errors.JaxRuntimeError) or "Gloo" in text or "NCCL" in text
    ):
        return  # our own errors (a bad row on one process) must not wait for the others
    _watchdog.done.wait(2 * _watchdog.timeout)


def _exit_lost(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # the main thread may be blocked in a collective that never returns


_watchdog: Watchdog | None = None


class Watchdog:
    """Names a lost process before JAX's coordination service aborts this one.

    JAX's own answer to a dead process is a C++ abort on every other one, racing whatever Python would
    print, and its status cannot reach a Python callback (jaxlib 0.10.2's ``missed_heartbeat_callback``
    dies converting it: ``std::bad_cast``). So every process writes a heartbeat key (host, pid, count)
    to the coordination service every ``timeout / 10`` s and reads everyone's. A process whose count did
    not move over ``timeout`` s of the service's answers is lost; when the service itself has not
    answered for ``timeout`` s, the coordinator (process 0) is. Either way this process prints which
    one (index, host, pid) and exits with status 1. A process that ends normally marks its key done.
    When process 0 itself dies and its connections close, JAX's error poll fails first and aborts at
    once ("Failed to send RPC to coordination service. Either the leader task ..."): fast, and it
    names the leader; this check covers a coordinator that goes silent instead.
    """

    PREFIX = "g2e_jax/alive/"

    def __init__(self, client, me: int, count: int, timeout_s: float, clock=time.monotonic, exit=_exit_lost):
        self.client, self.me, self.count, self.timeout = client, me, count, float(timeout_s)
        self.interval = self.timeout / 10
        self.clock, self.exit = clock, exit
        self.beats = 0
        self.started = self.last_ok = clock()  # the service's last answer
        self.seen: dict[int, tuple[str, float]] = {}  # process -> (its key, when it last changed)
        self.done = threading.Event()

    def _value(self, **extra) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "beat": self.beats, **extra})

    def beat(self) -> None:
        """One round: this process's key, then everyone's."""
        self.beats += 1
        self.client.key_value_set(f"{self.PREFIX}{self.me}", self._value(), allow_overwrite=True)
        keys = self.client.key_value_dir_get(self.PREFIX)
        now = self.clock()
        for key, value in keys:
            p = int(key.rsplit("/", 1)[1])
            if p not in self.seen or self.seen[p][0] != value:
                self.seen[p] = (value, now)
        self.last_ok = now

    def lost(self) -> str | None:
        """The message naming the lost process(es), or None while every process is heard from."""
        now = self.clock()
        if now - self.last_ok > self.timeout:
            return self._message([0], "the coordination service it runs has not answered")
        gone = []
        for p in range(self.count):
            value, since = self.seen.get(p, ("{}", self.started))
            if p != self.me and not json.loads(value).get("done") and self.last_ok - since > self.timeout:
                gone.append(p)
        return self._message(gone, "no heartbeat") if gone else None

    def _message(self, processes: list[int], why: str) -> str:
        def who(p):
            info = json.loads(self.seen.get(p, ("{}", 0))[0])
            return f"process {p}" + (f" (host {info['host']}, pid {info['pid']})" if "host" in info else "")

        return (
            f"process {self.me} of {self.count} on {socket.gethostname()}: lost {', '.join(map(who, processes))}: "
            f"{why} for {self.timeout:g} s (distributed.heartbeat_timeout_s); stopping. Re-run the same "
            "command on every host to resume from the last checkpoint."
        )

    def _beat_loop(self) -> None:
        while not self.done.wait(self.interval):
            try:
                self.beat()
            except Exception:  # noqa: BLE001, S110 - no answer this round; ``lost`` judges the silence
                pass

    def _judge_loop(self) -> None:
        while not self.done.wait(self.interval / 2):
            message = self.lost()
            if message is not None:
                if self.me == 0:  # the service lives here: keep it up so the others can name the same loss
                    self.done.wait(2 * self.interval)
                self.exit(message)
                return

    def start(self) -> None:
        import atexit

        self.beat()  # every process is connected (``initialize`` waited for all): the first round answers
        for loop in (self._beat_loop, self._judge_loop):
            threading.Thread(target=loop, name=f"g2e-watchdog{loop.__name__}", daemon=True).start()
        atexit.register(self.stop)  # runs before JAX's own atexit shutdown (registered at import)

    def stop(self) -> None:
        """This process ends normally: the others must not call it lost while they finish."""
        self.done.set()
        try:
            self.client.key_value_set(f"{self.PREFIX}{self.me}", self._value(done=True), allow_overwrite=True)
        except Exception:  # noqa: BLE001, S110 - the service may be gone already; nothing to tell it
            pass


def is_lead() -> bool:
    return jax.process_index() == 0


def share(n: int, process: int | None = None, count: int | None = None) -> range:
    """The contiguous rows ``[n * p / P, n * (p + 1) / P)`` process ``p`` of ``P`` prepares."""
    p = jax.process_index() if process is None else process
    count = jax.process_count() if count is None else count
    return range(n * p // count, n * (p + 1) // count)


def allgather_max(values) -> np.ndarray:
    """Element-wise maximum of an int vector over processes."""
    values = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).reshape(-1, *values.shape).max(axis=0)


def gather_shares(local: np.ndarray, n: int) -> np.ndarray:
    """Every process's ``share(n)`` rows of an array -> all ``n`` rows, in order, on every process."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    width = -(-n // jax.process_count())
    padded = np.zeros((width, *local.shape[1:]), local.dtype)
    padded[: len(local)] = local
    parts = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), width,
                                                                          *local.shape[1:])  # fmt: skip
    return np.concatenate([parts[p][: len(share(n, p))] for p in range(jax.process_count())])


def allgather_json(obj) -> list:
    """A JSON-able object from every process, in process order (error reports, bad rows)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    width = int(allgather_max([len(data)])[0])
    padded = np.zeros(width + 8, np.uint8)
    padded[:8] = np.frombuffer(np.int64(len(data)).tobytes(), np.uint8)
    padded[8 : 8 + len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), -1)
    out = []
    for row in rows:
        size = int(np.frombuffer(row[:8].tobytes(), np.int64)[0])
        out.append(json.loads(row[8 : 8 + size].tobytes().decode()))
    return out


def broadcast(value: np.ndarray) -> np.ndarray:
    """Process 0's array on every process (its shape and dtype must be known everywhere)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))
