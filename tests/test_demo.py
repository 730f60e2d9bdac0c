"""``g2e-jax demo`` end to end at a reduced size, through the command line, from a fresh working
directory with no --workdir (its default, relative ``g2e_demo``). The full-size demo with no arguments
at all is CI's job (.ci/run runs the README's command as typed)."""

from __future__ import annotations

import json
import os

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


def test_demo_runs_end_to_end(fresh_cwd):
    cwd = fresh_cwd("demo")
    result = run_cli(cwd, "demo", *REDUCED, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    for k in range(1, 12):
        assert f"[demo {k}/11]" in result.stdout
    demo = cwd / "g2e_demo"
    assert f"demo finished: {demo / 'report.md'}" in result.stdout
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
