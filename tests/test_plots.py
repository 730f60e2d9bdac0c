"""g2e_jax.plots: each figure is a PNG at its path, written atomically (no temporary left)."""

from __future__ import annotations

import json

import numpy as np

from g2e_jax import plots


def _png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_figure_is_a_png_and_leaves_no_temporary(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 1, "loss": 2.0}, {"step": 2, "loss": None},
                                                              {"step": 3, "loss": 1.5}]))  # fmt: skip
    plots.loss_curve(metrics, tmp_path / "loss.png")
    plots.grouped_bars({"a (mean 50.0)": [40.0, 60.0], "b (mean 70.0)": [70.0, 70.0]}, ["S1", "S2"],
                       tmp_path / "bars.png", title="t", ylabel="y", inch_per_group=0.5, rotation=45)  # fmt: skip
    plots.cosine_histogram(np.array([0.999999, 0.9999, np.nan]), tmp_path / "cos.png", threshold=0.99999)
    average = {"lambda": np.ones((2, 3)), "last_token": np.arange(1, 7.0).reshape(2, 3)}
    plots.attention_shares(average, ("system", "user", "header"), tmp_path / "att.png", "title")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["att.png", "bars.png", "cos.png", "loss.png", "metrics.jsonl"], names
    assert all(_png(tmp_path / n) for n in names if n.endswith(".png"))


def test_a_loss_file_without_finite_losses_writes_nothing(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": None}) + "\n")
    plots.loss_curve(metrics, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()
