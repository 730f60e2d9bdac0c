"""Shared fixtures: what many test files start from (the tiny model of each backbone, synthetic sets,
a mined cluster set, a short trained run) built once per pytest run and shared by every xdist worker
(``build_once``: a file lock in the run's shared temporary folder); running ``g2e-jax`` from fresh
working directories (``run_cli``, ``fresh_cwd``, ``written_paths``)."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from g2e_jax.paths import resolve_from

ROOT = Path(__file__).resolve().parents[1]

# Parity is judged in float32 at full matmul precision (DESIGN.md §3).
jax.config.update("jax_default_matmul_precision", "highest")

# As every g2e-jax command does (and so do the commands the tests run in subprocesses): a program
# compiled once on this machine is read back, not compiled again, by the next test that builds it.
from g2e_jax.compile_cache import enable_compile_cache  # noqa: E402

enable_compile_cache()

# The PyTorch reference packages: without them the parity tests skip, which CI must not allow.
REFERENCE_PACKAGES = ("torch", "transformers", "peft")
# Optional extras whose tests skip without them locally but must run in CI (.ci/run installs them).
CI_EXTRAS = ("mteb",)


def pytest_configure(config):
    """Under CI (``CI=true``, as .ci/run and most CI services set it) a missing reference package is fatal."""
    if os.environ.get("CI", "").lower() not in ("true", "1"):
        return
    for name in REFERENCE_PACKAGES + CI_EXTRAS:
        try:
            __import__(name)
        except ImportError as e:
            how = f'pip install -e ".[{name}]"' if name in CI_EXTRAS else "README, Install"
            raise pytest.UsageError(
                f"CI=true but {name} cannot be imported ({e}): the tests that need it would be skipped. "
                f"Install it ({how}) or unset CI for a local run."
            ) from e


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first, each file's tests together and in their order: xdist's workers
    take tests from the front of this list, so the long ones start early and the short ones fill
    the end, and both workers finish together (the longest-first rule). The order is the same on
    every worker (xdist requires it)."""
    heavy = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in heavy)  # stable: the order within each group is kept


def report(case: str, **values) -> None:
    """One greppable line per measured quantity (visible with ``pytest -s``)."""
    items = " ".join(f"{k}={v:.3e}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"\n[parity] {case}: {items}")


def real_token_diff(ref: np.ndarray, out: np.ndarray, mask: np.ndarray) -> float:
    """Max abs difference over the real (attention_mask == 1) positions of ``[B, L, H]`` states."""
    mask = np.asarray(mask).astype(bool)
    return float(np.abs(np.asarray(ref)[mask] - np.asarray(out)[mask]).max())


def pooled_cosine(ref: np.ndarray, out: np.ndarray, mask: np.ndarray) -> float:
    """Minimum cosine between the two models' last-real-token states (the embedding we pool)."""
    mask = np.asarray(mask).astype(bool)
    last = np.array([np.flatnonzero(row)[-1] for row in mask])
    a = np.asarray(ref)[np.arange(len(last)), last]
    b = np.asarray(out)[np.arange(len(last)), last]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(cos.min())


def assert_parity(case: str, ref: np.ndarray, out: np.ndarray, mask: np.ndarray, **extra) -> None:
    """Reports, then checks final hidden states against the reference's: max abs difference over real
    tokens <= 1e-4 and pooled cosine >= 0.99999 (DESIGN.md §3)."""
    diff = real_token_diff(ref, out, mask)
    cosine = pooled_cosine(ref, out, mask)
    report(case, max_abs_diff=diff, pooled_one_minus_cosine=1.0 - cosine, ref_max_abs=float(np.abs(ref).max()),
           **extra)  # fmt: skip
    assert np.shape(out) == np.shape(ref)
    assert diff <= 1e-4
    assert cosine >= 0.99999


def shared_root(tmp_path_factory) -> Path:
    """The folder of this pytest run that all its xdist workers see: each worker's base temporary
    folder is a child of the run's (pytest-xdist's documented recipe); without xdist, the run's own."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(parents=True, exist_ok=True)
    return root


def build_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` once per pytest run, whichever worker asks first; the others wait on a file
    lock and get the same folder. A build that raised is retried by the next caller (and fails it
    again), never handed on half-written. Consumers must not write into the folder: copy it."""
    from filelock import FileLock

    root = shared_root(tmp_path_factory)
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``tiny_models(arch, seed=0)``: the tiny random model of a backbone (a ``models.BACKBONES``
    key), as ``g2e-jax make-tiny --arch ARCH --seed SEED`` writes it, once per run."""
    from g2e_jax.models import make_tiny

    def get(arch: str, seed: int = 0) -> Path:
        return build_once(tmp_path_factory, f"tiny-{arch}-{seed}",
                          lambda folder: make_tiny(folder / "model", arch=arch, seed=seed)) / "model"  # fmt: skip

    return get


@pytest.fixture(scope="session")
def tiny_dir(tiny_models):
    return tiny_models("qwen2_vl")


@pytest.fixture(scope="session")
def synthetic_sets(tmp_path_factory):
    """``synthetic_sets(**kwargs)``: ``make_synthetic(folder, **kwargs)``'s set, once per run for each
    distinct ``kwargs`` (read only: a test that breaks files copies it first)."""
    from g2e_jax.data.synthetic import make_synthetic

    def get(**kwargs) -> Path:
        name = "synthetic-" + "-".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
        return build_once(tmp_path_factory, name, lambda folder: make_synthetic(folder / "data", **kwargs)) / "data"

    return get


def shared_results(tmp_path_factory, name: str, script: str, *args: str, devices: int = 8,
                   timeout: int = 1500) -> dict:
    """The JSON that a driver script in tests/ writes (its last argument: the output path), run once
    per pytest run in a subprocess with ``devices`` simulated CPU devices (fixed when JAX starts)."""

    def build(folder):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / script), *args, str(folder / "results.json")],
                              env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]

    return json.loads((build_once(tmp_path_factory, name, build) / "results.json").read_text())


@pytest.fixture(scope="session")
def jax_model(tiny_dir):
    from g2e_jax.models.qwen2_vl import load

    return load(tiny_dir, progress=False)


def run_cli(cwd: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``g2e-jax ARGS`` in a subprocess whose working directory is ``cwd`` (this checkout's code)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    command = [sys.executable, "-m", "g2e_jax.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port free on this machine now (for a test's own JAX coordinator)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """A child process whose stdout and stderr go to ``<log>.out`` and ``<log>.err``, never to pipes:
    a pipe that the test is not reading at the moment (it waits for another process, or polls a file)
    fills at 64 KiB and stops the child, and in a multi-process run its peer then waits for it at a
    collective or at JAX's shutdown barrier until that times out. ``logs(proc)`` reads them back."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, **kwargs)
    proc.log = log
    return proc


def logs(proc: subprocess.Popen) -> tuple[str, str]:
    """(stdout, stderr) of a ``spawn``ed process so far."""
    return Path(f"{proc.log}.out").read_text(), Path(f"{proc.log}.err").read_text()


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """Waits for every process (one deadline for all); unless all exit 0, fails with each one's exit
    status and the end of its stderr: in a multi-process run the first error is often another
    process's."""
    import time

    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if any(p.returncode != 0 for p in procs):
        raise AssertionError("\n".join(
            f"--- process {i}: exit status {p.returncode}, pid {p.pid}; end of its stderr:\n"
            f"{logs(p)[1][-2500:]}" for i, p in enumerate(procs)
        ))  # fmt: skip
    return [logs(p) for p in procs]


@pytest.fixture
def fresh_cwd(tmp_path_factory):
    """``fresh_cwd(name)``: a new empty folder to run a command in; each one at another depth, so that a
    path relative to one command's working directory never happens to resolve from the next one's."""
    count = itertools.count(1)

    def make(name: str) -> Path:
        folder = tmp_path_factory.mktemp(name).joinpath(*["sub"] * next(count))
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    return make


PATH_KEY = re.compile(r"^(path|root|input|image|model_path|\w+_dir|\w+_file|\w+_path)$")


def written_paths(folder: Path, *, exclude: tuple[Path, ...] = ()):
    """(file, key, value, resolved) for every path-like string value in the JSON and JSONL files under
    ``folder`` (``exclude``: folders of dataset files with their own convention, e.g. MMEB rows)."""

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str) and value and PATH_KEY.match(key):
                    yield key, value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    for file in sorted(folder.rglob("*.json*")):
        if file.suffix not in (".json", ".jsonl") or any(file.is_relative_to(e) for e in exclude):
            continue
        text = file.read_text(encoding="utf-8")
        docs = [
            json.loads(doc)
            for doc in (text.splitlines() if file.suffix == ".jsonl" else [text])
            if doc.strip()
        ]
        for doc in docs:
            for key, value in walk(doc):
                yield file, key, value, Path(resolve_from(file, value))


MINE_SUBSETS = "('SynShape', 'SynT2I', 'SynGround')"
# The shared trained run's adapter: DoRA with adapter dropout (GradCache is on in configs/tiny.py).
DORA = ["--config.adapter.kind=dora", "--config.adapter.dropout=0.1"]


@pytest.fixture(scope="session")
def mined_set(tmp_path_factory, tiny_dir, synthetic_sets):
    """SaHa clusters that ``mine`` (configs/tiny.py) writes for the tiny model on the synthetic set
    ``synthetic_sets(train_rows=12, eval_queries=2)``, once per run."""

    def build(folder):
        from g2e_jax.config_utils import load_config
        from g2e_jax.mine import run_mine

        data = synthetic_sets(train_rows=12, eval_queries=2)
        run_mine(load_config(str(ROOT / "configs/tiny.py"), [
            f"model.path={tiny_dir}", f"data.root={data / 'train'}", f"data.image_dir={data / 'images'}",
            f"data.subsets={MINE_SUBSETS}", f"mine.output_dir={folder / 'mined'}",
        ]))  # fmt: skip

    return build_once(tmp_path_factory, "mined", build) / "mined"


def train_args(tiny_dir: Path, data: Path, mined: Path) -> list[str]:
    """``g2e-jax train`` overrides of the shared short run: 12 steps on the mined clusters, a line every
    2 steps and a checkpoint every 4."""
    return [f"--config.model.path={tiny_dir}", f"--config.data.clusters_dir={mined}",
            f"--config.data.image_dir={data / 'images'}", f"--config.data.subsets={MINE_SUBSETS}",
            "--config.train.steps=12", "--config.train.log_every=2", "--config.train.checkpoint_every=4",
            "--config.train.warmup_steps=2"]  # fmt: skip


def train_cmd(workdir: Path, args: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "g2e_jax.cli", "train", "--config", str(ROOT / "configs/tiny.py"),
            "--workdir", str(workdir), *args, *extra]  # fmt: skip


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_dir, synthetic_sets, mined_set):
    """One short training run (``train_args`` + ``DORA``, as ``g2e-jax train`` runs it), once per run:
    the workdir that the resume, export and embed tests start from (read only: copy it to change it)."""

    def build(folder):
        data = synthetic_sets(train_rows=12, eval_queries=2)
        proc = subprocess.run(train_cmd(folder / "run", train_args(tiny_dir, data, mined_set), *DORA),
                              capture_output=True, text=True, timeout=900, cwd=ROOT)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]

    return build_once(tmp_path_factory, "trained-run", build) / "run"
