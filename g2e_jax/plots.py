"""Every figure the commands write (PNG, Agg backend, written atomically): training loss, grouped
bars of evaluation scores, the compare histogram, the attention profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def new_figure(width: float, height: float):
    """(figure, axes) on the file-only Agg backend (no display needed, any thread)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def save(fig, path: str | Path) -> None:
    """The figure as PNG, written under a temporary name and renamed; the figure is closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def grouped_bars(series: dict[str, list[float]], groups: list[str], path: Path, *, title: str, ylabel: str,
                 inch_per_group: float, rotation: int) -> None:  # fmt: skip
    """One bar per (group, series), series side by side within each group, on a 0-100 scale."""
    x = np.arange(len(groups))
    width = 0.8 / len(series)
    fig, ax = new_figure(max(6, inch_per_group * len(groups) + 2), 4)
    for k, (label, values) in enumerate(series.items()):
        ax.bar(x + k * width - 0.4 + width / 2, values, width, label=label)
    ax.set_xticks(x, groups, rotation=rotation, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend()
    save(fig, path)


def loss_curve(metrics_file: Path, path: Path) -> None:
    """The training loss of ``metrics.jsonl`` by step (non-finite steps, logged as null, left out)."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    records = [r for r in records if r.get("loss") is not None]
    if not records:
        return
    fig, ax = new_figure(6, 3.5)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("training loss")
    save(fig, path)


def cosine_histogram(cosines: np.ndarray, path: Path, threshold: float | None = None) -> None:
    """Per-row cosines on a log scale of 1 - cosine (they crowd just below 1)."""
    fig, ax = new_figure(7, 3.5)
    finite = cosines[np.isfinite(cosines)]
    if len(finite):
        gap = np.clip(1.0 - finite, 1e-12, None)
        bins = np.logspace(np.log10(gap.min()) - 0.1, np.log10(max(gap.max(), gap.min() * 10)) + 0.1, 40)
        ax.hist(gap, bins=bins, color="tab:blue")
        ax.set_xscale("log")
        ax.set_title(f"{len(finite)} rows, min cosine {finite.min():.8f}")
    else:
        ax.set_title("no rows compared")
    if threshold is not None and threshold < 1:
        ax.axvline(1.0 - threshold, color="tab:red", linestyle="--", label=f"--fail-below {threshold}")
        ax.legend()
    ax.set_xlabel("1 - cosine(official, g2e_jax)  (floored at 1e-12)")
    ax.set_ylabel("rows")
    save(fig, path)


def attention_shares(average: dict, segments, path: Path, title: str) -> None:
    """Per layer, each segment's share of the attention mass: over every query token (solid) and for
    the pooled token alone (dashed)."""
    lam, last = np.asarray(average["lambda"]), np.asarray(average["last_token"])
    share, last_share = lam / lam.sum(-1, keepdims=True), last / last.sum(-1, keepdims=True)
    layers = np.arange(1, len(lam) + 1)
    fig, ax = new_figure(7, 4)
    for k, name in enumerate(segments):
        (line,) = ax.plot(layers, share[:, k], marker="o", label=f"{name} (all tokens)")
        ax.plot(
            layers, last_share[:, k], linestyle="--", color=line.get_color(), label=f"{name} (pooled token)"
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("share of attention")
    ax.set_ylim(0, 1)
    ax.set_xticks(layers)
    ax.set_title(title)
    ax.legend(fontsize=8)
    save(fig, path)
