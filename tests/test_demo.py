"""``g2e-jax demo`` end to end at a reduced size, through the command line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np


def test_demo_runs_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "g2e_jax.cli", "demo", "--workdir", str(tmp_path / "demo"),
         "--config.synthetic.train_rows=8", "--config.synthetic.eval_queries=6", "--config.sugarcrepe_items=3",
         "--config.train_steps=4"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for k in range(1, 12):
        assert f"[demo {k}/11]" in result.stdout
    report = (tmp_path / "demo" / "report.md").read_text()
    assert (
        "| plain | hierarchical | fine-tuned (in-batch) | fine-tuned (SaHa) |" in report
        and "| overall |" in report
    )
    assert "## Zero-shot -> in-batch baseline -> SaHa" in report and "| in-batch |" in report
    assert (tmp_path / "demo" / "train_inbatch" / "loss.png").is_file()
    assert "## Fine-tuning" in report and (tmp_path / "demo" / "train" / "loss.png").stat().st_size > 1000
    assert "## SugarCrepe" in report and "## Exported embeddings" in report and "## SaHa mining" in report
    assert (tmp_path / "demo" / "mmeb" / "results.png").stat().st_size > 1000
    emb = np.load(tmp_path / "demo" / "corpus_embeddings" / "embeddings.npy")
    ids = (tmp_path / "demo" / "corpus_embeddings" / "ids.txt").read_text().split()
    assert emb.shape[0] == len(ids) > 0 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
