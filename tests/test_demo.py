"""``g2e-jax demo`` end to end at a reduced size, through the command line, from a fresh working
directory with no --workdir (its default, relative ``g2e_demo``). The full-size demo with no arguments
at all is CI's job (.ci/run runs the README's command as typed); there, .ci/run names the directory
it ran in (``$G2E_JAX_DEMO_RAN_IN``: its ``g2e_demo`` and the console log ``demo.log``) and this test
checks that run instead of running a second demo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, written_paths

pytestmark = pytest.mark.slow

REDUCED = (
    "--config.synthetic.train_rows=8",
    "--config.synthetic.eval_queries=6",
    "--config.sugarcrepe_items=3",
    "--config.train_steps=4",
)


def _demo_run(fresh_cwd) -> tuple[Path, str]:
    """(the folder the demo ran in, its console output): CI's full-size run when .ci/run names it,
    else a reduced run here."""
    ran_in = os.environ.get("G2E_JAX_DEMO_RAN_IN")
    if ran_in:
        return Path(ran_in), (Path(ran_in) / "demo.log").read_text()
    cwd = fresh_cwd("demo")
    result = run_cli(cwd, "demo", *REDUCED, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result.stdout


def test_demo_runs_end_to_end(fresh_cwd):
    cwd, stdout = _demo_run(fresh_cwd)
    for k in range(1, 12):
        assert f"[demo {k}/11]" in stdout
    demo = cwd / "g2e_demo"
    assert f"demo finished: {demo / 'report.md'}" in stdout
    report = (demo / "report.md").read_text()
    assert (
        "| plain | hierarchical | fine-tuned (in-batch) | fine-tuned (SaHa) |" in report
        and "| overall |" in report
    )
    assert "## Zero-shot -> in-batch baseline -> SaHa" in report and "| in-batch |" in report
    assert (demo / "train_inbatch" / "loss.png").is_file()
    assert "## Fine-tuning" in report and (demo / "train" / "loss.png").stat().st_size > 1000
    assert "## SugarCrepe" in report and "## Exported embeddings" in report and "## SaHa mining" in report
    assert (demo / "mmeb" / "results.png").stat().st_size > 1000
    emb = np.load(demo / "corpus_embeddings" / "embeddings.npy")
    ids = (demo / "corpus_embeddings" / "ids.txt").read_text().split()
    assert emb.shape[0] == len(ids) > 0 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    # The corpus names its images relative to itself: the demo folder can move as a whole.
    corpus = [json.loads(line) for line in (demo / "corpus.jsonl").read_text().splitlines()]
    assert any(r["image"] for r in corpus) and not any(os.path.isabs(r["image"] or "") for r in corpus)
    paths = list(written_paths(demo, exclude=(demo / "synthetic" / "train", demo / "synthetic" / "eval")))
    assert len(paths) > 10
    for file, key, value, resolved in paths:
        assert resolved.exists(), f"{file}: {key}={value!r} does not resolve against the file"
