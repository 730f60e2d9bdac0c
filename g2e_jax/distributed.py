"""Multi-host jobs: JAX's distributed runtime, each process's share of the rows, and gathers.

Every job that encodes (``train``'s eval, ``eval``, ``mine``, ``embed``) runs the same program on
every process: each prepares only its share of the rows (``share``), the device batches are built
from every process's part, and the results are gathered so that every process holds them; only
process 0 (``is_lead``) writes files. With one process every helper is a no-op.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from ml_collections import config_dict


def distributed_section() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.coordinator = config_dict.placeholder(
        str
    )  # "host:port"; None: auto-detect (TPU, SLURM) or single process
    d.num_processes = config_dict.placeholder(int)
    d.process_id = config_dict.placeholder(int)
    # A process that sends no heartbeat for this long is dead: JAX stops every other process with
    # "Task K heartbeat timeout" (K = the lost process id), so a pod never hangs on a lost host.
    d.heartbeat_timeout_s = 100
    d.initialization_timeout_s = 300  # how long processes wait for each other at start
    return d


def init_distributed(cfg) -> None:
    """``jax.distributed.initialize``: explicit coordinator, or JAX's own detection on TPU / SLURM;
    timeouts from ``cfg.distributed`` (one helper for every multi-process command)."""
    d = cfg.get("distributed")
    if d is None or jax.distributed.is_initialized():
        return
    timeouts = {
        "heartbeat_timeout_seconds": int(d.get("heartbeat_timeout_s", 100)),
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
    import socket

    print(
        f"distributed: process {jax.process_index()} of {jax.process_count()} (JAX 'task "
        f"{jax.process_index()}') on {socket.gethostname()}, pid {os.getpid()}; a process silent for "
        f"{timeouts['heartbeat_timeout_seconds']} s stops the others",
        flush=True,
    )


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
