"""2 processes x 2 CPU devices run `eval`, `mine` and `embed` (and resume an export another run
started) with the same results as 1 process x 1 device; only process 0 writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port, report, spawn, wait_all

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "multiprocess_jobs.py")


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    from g2e_jax.data.mmeb import read_eval
    from g2e_jax.data.synthetic import make_synthetic

    base = tmp_path_factory.mktemp("mp")
    data = make_synthetic(base / "data", train_rows=12, eval_queries=3)
    rows = [{"id": f"c{i}", "text": t, "image": im} for i, (t, im) in enumerate(
        (t, im) for r in read_eval(data / "eval", "SynT2I", image_dir=data / "images")
        for t, im in zip(r.tgt_texts, r.tgt_images))][:13]  # fmt: skip
    # A bad row in process 1's share of its shard: its report must reach process 0's skipped.jsonl.
    rows.insert(7, {"id": "bad", "text": "", "image": str(data / "missing.png")})
    (data / "embed_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    single, multi = base / "single", base / "multi"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, SCRIPT, str(single), str(tiny_dir), str(data)], env=env,
                          capture_output=True, text=True, timeout=1500, cwd=HERE.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The 2-process run resumes the single run's export after losing its last shard.
    shutil.copytree(single / "embed", multi / "resume")
    last = sorted((multi / "resume" / "shards").glob("*.npy"))[-1]
    last.unlink()
    last.with_suffix(".json").unlink()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    port = free_port()
    procs = [
        spawn(
            [sys.executable, SCRIPT, str(multi), str(tiny_dir), str(data), f"127.0.0.1:{port}", "2", str(i)],
            base / f"process{i}",
            env=env,
            cwd=HERE.parent,
        )
        for i in range(2)
    ]
    wait_all(procs, timeout=1500)
    return single, multi


@pytest.mark.slow
def test_eval_results_are_identical(runs):
    single, multi = runs
    a = json.loads((single / "eval" / "results.json").read_text())
    b = json.loads((multi / "eval" / "results.json").read_text())
    assert a == b


@pytest.mark.slow
def test_mined_clusters_are_identical(runs):
    single, multi = runs
    for subset in ("SynShape", "SynT2I"):
        text = (single / "mined" / subset / "original.jsonl").read_text()
        assert text and text == (multi / "mined" / subset / "original.jsonl").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("run", ["embed", "resume"])
def test_embeddings_are_identical(runs, run):
    single, multi = runs
    a = np.load(single / "embed" / "embeddings.npy")
    b = np.load(multi / run / "embeddings.npy")
    diff = float(np.abs(a - b).max())
    report(f"2 processes x 2 devices vs 1 x 1: embed ({run})", max_abs_diff=diff, rows=len(a))
    assert a.shape == b.shape == (13, a.shape[1]) and diff <= 1e-6
    for name in ("ids.txt", "skipped.jsonl"):
        assert (single / "embed" / name).read_text() == (multi / run / name).read_text()
    assert json.loads((multi / run / "skipped.jsonl").read_text())["id"] == "bad"
    if run == "resume":
        assert json.loads((multi / "resume_meta.json").read_text())["resumed_rows"] == 12
