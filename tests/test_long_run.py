"""What long runs meet, on the tiny model: bad rows mid-run (error / skip, and a resume that skips the
same rows), non-finite steps (a NaN injected into batches), a workdir that cannot take a checkpoint,
and a process killed in a 2-process run."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import free_port, logs, report, spawn, wait_all

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clean(synthetic_sets):
    return synthetic_sets(train_rows=12, eval_queries=2)


@pytest.fixture(scope="module")
def broken(clean, tmp_path_factory):
    """The issue's set: training images truncated, emptied and missing (a copy of the shared one)."""
    import shutil

    data = tmp_path_factory.mktemp("broken") / "data"
    shutil.copytree(clean, data)
    image = data / "images/SynT2I/train_00010.png"
    image.write_bytes(image.read_bytes()[:200])
    (data / "images/SynShape/train_00003.png").write_bytes(b"")
    (data / "images/SynT2I/train_00004.png").unlink()
    return data


def _cfg(tiny_dir, data, workdir, *overrides):
    from g2e_jax.config_utils import load_config

    return load_config(
        str(ROOT / "configs/tiny.py"),
        [
            f"model.path={tiny_dir}",
            "data.source=mmeb",
            f"data.root={data / 'train'}",
            f"data.image_dir={data / 'images'}",
            "data.subsets=('SynShape', 'SynT2I')",
            f"data.check_cache={workdir.parent / (workdir.name + '-check.json')}",
            "train.log_every=1",
            "train.warmup_steps=2",
            *overrides,
        ],
    )


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_bad_rows_error_or_skip_and_a_resume_skips_the_same(tiny_dir, broken, tmp_path):
    from g2e_jax.train.trainer import train

    # Checked before the run: every bad row at once, before any step.
    with pytest.raises(ValueError, match="3 bad row") as error:
        train(
            _cfg(tiny_dir, broken, tmp_path / "checked", "train.steps=12"),
            tmp_path / "checked",
            progress=False,
        )
    assert "SynT2I/original.jsonl:11  pos_image_path" in str(error.value)
    assert not (tmp_path / "checked" / "metrics.jsonl").exists()
    # Unchecked, "error": the run stops at the first bad row it meets, naming file, line and field.
    unchecked = ["data.check=False", "train.steps=12"]
    with pytest.raises(ValueError, match=r"original\.jsonl line \d+, field '(pos|qry)_image_path'") as error:
        train(_cfg(tiny_dir, broken, tmp_path / "strict", *unchecked), tmp_path / "strict", progress=False)
    assert "row 0" not in str(error.value)
    # "skip": two epochs of 6 steps meet each of the 3 bad rows twice; the run finishes.
    straight = tmp_path / "straight"
    train(_cfg(tiny_dir, broken, straight, "data.bad_rows=skip", "train.steps=12"), straight, progress=False)
    skipped = _lines(straight / "skipped.jsonl")
    print("\n" + (straight / "skipped.jsonl").read_text())
    assert len(skipped) == 6 and _lines(straight / "metrics.jsonl")[-1]["step"] == 12
    seen = collections.Counter((r["subset"], Path(r["file"]).name, r["line"], r["field"]) for r in skipped)
    assert seen == {
        ("SynShape", "original.jsonl", 4, "qry_image_path"): 2,
        ("SynT2I", "original.jsonl", 5, "pos_image_path"): 2,
        ("SynT2I", "original.jsonl", 11, "pos_image_path"): 2,
    }
    # Resumed from step 4 after reaching step 8: the same skips, recorded once each.
    resumed = tmp_path / "resumed"
    cfg = _cfg(tiny_dir, broken, resumed, "data.bad_rows=skip", "train.steps=8", "train.checkpoint_every=4")
    train(cfg, resumed, progress=False)
    import shutil

    shutil.rmtree(resumed / "checkpoints" / "8")
    cfg = _cfg(tiny_dir, broken, resumed, "data.bad_rows=skip", "train.steps=12", "train.checkpoint_every=4")
    train(cfg, resumed, progress=False)
    assert _lines(resumed / "skipped.jsonl") == skipped


@pytest.mark.slow
def test_non_finite_steps_change_nothing_and_stop_the_run(tiny_dir, clean, tmp_path, monkeypatch):
    """NaN pixels in the batches of steps 3, 5 and 6, train.max_bad_steps=2: step 3 is refused and the
    run goes on; 5 and 6 in a row stop it with a checkpoint at 6 that holds step 4's state."""
    from g2e_jax.checkpoints import load_trained
    from g2e_jax.train import feed, trainer
    from g2e_jax.train.guards import TrainingStopped

    poison = {3, 5, 6}
    original = feed.global_batch

    def global_batch(run, step, rows=None):
        batch, subset = original(run, step, rows)
        if step + 1 in poison:
            batch["query"] = dict(batch["query"], pixel_values=batch["query"]["pixel_values"] * jnp.nan)
        return batch, subset

    monkeypatch.setattr(feed, "global_batch", global_batch)
    workdir = tmp_path / "nan"
    cfg = _cfg(
        tiny_dir,
        clean,
        workdir,
        "data.subsets=('SynShape',)",
        "train.steps=10",
        "train.checkpoint_every=4",
        "train.max_bad_steps=2",
    )
    with pytest.raises(TrainingStopped) as error:
        trainer.train(cfg, workdir, progress=False)
    message = str(error.value)
    print(f"\n{message}")
    assert (
        "stopping at step 6: 2 non-finite steps in a row" in message and "the state after step 4" in message
    )
    metrics = {r["step"]: r for r in _lines(workdir / "metrics.jsonl")}
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
    assert [metrics[s]["bad_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 2, 3]
    assert metrics[3]["loss"] is None and metrics[4]["loss"] is not None
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 6]
    a = {k: np.asarray(v) for k, v in jax_state(load_trained(workdir, step=4)[0]).items()}
    b = {k: np.asarray(v) for k, v in jax_state(load_trained(workdir, step=6)[0]).items()}
    assert all(np.array_equal(a[k], b[k]) for k in a)
    report("NaN injected at steps 3, 5, 6 (max_bad_steps=2)", stopped_at=6, bad_steps=metrics[6]["bad_steps"])


def jax_state(model):
    from flax import nnx

    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def test_preflight_refuses_an_unwritable_workdir_or_a_full_disk(tmp_path, monkeypatch):
    import shutil

    from g2e_jax.train import guards

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match="is not writable"):
        guards.preflight_workdir(blocker / "run")
    guards.preflight_workdir(tmp_path / "run", need_bytes=1 << 20)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(guards.shutil, "disk_usage", lambda p: usage._replace(free=100 << 20))
    with pytest.raises(OSError, match="0.10 GiB free, but a checkpoint needs about 1.06 GiB"):
        guards.preflight_workdir(tmp_path / "run", need_bytes=1 << 30)


@pytest.mark.slow
def test_train_checks_the_disk_before_the_first_step(tiny_dir, clean, tmp_path, monkeypatch):
    import shutil

    from g2e_jax.train import guards
    from g2e_jax.train.trainer import train

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(guards.shutil, "disk_usage", lambda p: usage._replace(free=(64 << 20) + 1024))
    workdir = tmp_path / "full"
    with pytest.raises(OSError, match="GiB free, but a checkpoint needs"):
        train(_cfg(tiny_dir, clean, workdir, "train.steps=2"), workdir, progress=False)
    assert not (workdir / "metrics.jsonl").exists() and not (workdir / "checkpoints").exists()


class _Service:
    """The coordination service's key-value store, as two ``Watchdog`` s see it; ``down`` = no answers."""

    def __init__(self):
        self.store, self.down = {}, False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE")
        self.store[key] = value

    def key_value_dir_get(self, prefix):
        if self.down:
            raise RuntimeError("UNAVAILABLE")
        return [(k, v) for k, v in sorted(self.store.items()) if k.startswith(prefix)]


def test_the_watchdog_names_a_silent_process_or_the_coordinator_and_not_one_that_ended():
    from g2e_jax.distributed import Watchdog

    now = [0.0]
    service = _Service()
    dogs = [Watchdog(service, p, 2, timeout_s=10, clock=lambda: now[0]) for p in range(2)]

    def rounds(n, who=(0, 1)):
        for _ in range(n):
            now[0] += 2
            for p in who:
                try:
                    dogs[p].beat()
                except RuntimeError:
                    pass

    rounds(10)
    assert dogs[0].lost() is None and dogs[1].lost() is None
    rounds(6, who=(0,))  # process 0 saw process 1's last beat at its next round, 10 s ago: not yet
    assert dogs[0].lost() is None
    rounds(1, who=(0,))
    message = dogs[0].lost()
    assert (
        message.startswith("process 0 of 2")
        and f"lost process 1 (host {socket.gethostname()}, pid" in message
    )
    assert "no heartbeat for 10 s (distributed.heartbeat_timeout_s)" in message
    # A process that ended normally is never called lost.
    dogs[1].stop()
    rounds(20, who=(0,))
    assert dogs[0].lost() is None
    # The service stops answering: process 1 blames the coordinator, not a peer whose key went stale
    # with it (process 2 missed the last two rounds before the outage).
    dogs = [Watchdog(service, p, 3, timeout_s=10, clock=lambda: now[0]) for p in range(3)]
    service.store.clear()
    rounds(10, who=(0, 1, 2))
    rounds(2, who=(0, 1))
    service.down = True
    rounds(5)
    assert dogs[1].lost() is None
    rounds(1)
    assert "lost process 0 (host" in dogs[1].lost() and "has not answered for 10 s" in dogs[1].lost()

    # The threads: a real clock, a peer that never beats, and the exit this process would take.
    service = _Service()
    said = []
    started = time.monotonic()
    dog = Watchdog(service, 1, 2, timeout_s=0.5, exit=lambda m: said.append((m, time.monotonic() - started)))
    dog.start()
    while not said and time.monotonic() - started < 10:
        time.sleep(0.05)
    dog.stop()
    assert said and "lost process 0" in said[0][0] and 0.5 < said[0][1] < 2, said


@pytest.mark.slow
def test_a_killed_process_stops_the_other_and_the_run_resumes(tiny_dir, clean, tmp_path):
    """2 CPU processes; SIGKILL process 1 mid-run: process 0 exits within the heartbeat timeout (10 s)
    plus a margin, naming task 1; the same command then resumes from the last checkpoint."""
    workdir = tmp_path / "pod"
    port = free_port()

    def command(steps, pid):
        return [
            sys.executable,
            "-m",
            "g2e_jax.cli",
            "train",
            "--config",
            str(ROOT / "configs/tiny.py"),
            "--workdir",
            str(workdir),
            f"--config.model.path={tiny_dir}",
            "--config.data.source=mmeb",
            f"--config.data.root={clean / 'train'}",
            f"--config.data.image_dir={clean / 'images'}",
            "--config.data.subsets=('SynShape', 'SynT2I')",
            "--config.data.check=False",
            f"--config.train.steps={steps}",
            "--config.train.log_every=1",
            "--config.train.checkpoint_every=2",
            f"--config.distributed.coordinator=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={pid}",
            "--config.distributed.heartbeat_timeout_s=10",
        ]

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [spawn(command(1000, i), tmp_path / f"first{i}", cwd=ROOT, env=env) for i in range(2)]
    try:
        start = time.time()
        while not any(r["step"] >= 5 for r in _lines(workdir / "metrics.jsonl")):
            assert all(p.poll() is None for p in procs), [logs(p)[1][-2000:] for p in procs]
            assert time.time() - start < 900, "no progress"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        procs[0].wait(timeout=120)
        seconds = time.time() - killed
        err = logs(procs[0])[1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    report("2 processes, SIGKILL of process 1: process 0 exits after", seconds=seconds)
    print(err[-1500:])
    assert procs[0].returncode != 0
    assert seconds < 10 + 30
    assert "Task 1" in err or "task 1" in err or "process 1" in err
    # The same command again (fewer steps, to keep the test short) resumes from the last checkpoint.
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    port = free_port()
    procs = [spawn(command(saved[-1] + 2, i), tmp_path / f"again{i}", cwd=ROOT, env=env) for i in range(2)]
    outs = wait_all(procs, timeout=600)
    assert "resuming from the checkpoint at step" in outs[0][0]
    resumed = int(outs[0][0].split("resuming from the checkpoint at step ")[1].split()[0])
    assert resumed >= 2 and _lines(workdir / "metrics.jsonl")[-1]["step"] == saved[-1] + 2
    # Another step count, the same program: the schedule's numbers are arguments of the step, so the
    # resumed run reads it back from the compilation cache instead of compiling it again.
    timing = json.loads((workdir / "timing.json").read_text())
    assert timing["first_compile_programs"] == 0, timing
