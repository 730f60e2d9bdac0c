"""Per-row agreement and the three result files: ``compare.json``, ``compare.md``, ``compare.png``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from g2e_jax import plots
from g2e_jax.io import write_atomic


def row_metrics(official: np.ndarray, ours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: cosine of the two embeddings (float64) and max absolute element difference."""
    a, b = np.asarray(official, np.float64), np.asarray(ours, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"official embeddings are {a.shape}, g2e_jax's {b.shape}: not the same rows / width")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (a * b).sum(1) / norms
    return cos, np.abs(a - b).max(axis=1) if a.size else np.zeros(len(a))


class Rows:
    """Every compared row: id, cosine, max abs difference, and what it was (for the worst-rows table)."""

    def __init__(self):
        self.ids, self.cos, self.diff, self.what = [], [], [], []

    def add(self, ids, official, ours, texts, images) -> tuple[np.ndarray, np.ndarray]:
        cos, diff = row_metrics(official, ours)
        self.ids += list(ids)
        self.cos.append(cos)
        self.diff.append(diff)
        self.what += [{"text": t[:120], "image": im} for t, im in zip(texts, images)]
        return cos, diff

    def records(self) -> str:
        """Every row as a JSON line: id, cosine, max abs difference."""
        cos, diff = self.cosines(), np.concatenate(self.diff) if self.diff else np.zeros(0)
        return "".join(
            json.dumps({"id": i, "cosine": _num(c), "max_abs_diff": _num(d)}) + "\n"
            for i, c, d in zip(self.ids, cos, diff)
        )

    def cosines(self) -> np.ndarray:
        return np.concatenate(self.cos) if self.cos else np.zeros(0)

    def summary(self, worst: int) -> dict:
        cos, diff = self.cosines(), np.concatenate(self.diff) if self.diff else np.zeros(0)
        order = np.argsort(np.nan_to_num(cos, nan=-np.inf), kind="stable")[:worst]
        return {
            "rows": len(cos),
            "min_cosine": _num(np.nanmin(cos) if len(cos) and not np.isnan(cos).all() else None),
            "mean_cosine": _num(np.nanmean(cos) if len(cos) and not np.isnan(cos).all() else None),
            "nan_rows": int(np.isnan(cos).sum()),
            "max_abs_diff": _num(diff.max() if len(diff) else None),
            "worst": [
                {"id": self.ids[i], "cosine": _num(cos[i]), "max_abs_diff": _num(diff[i]), **self.what[i]}
                for i in order
            ],
        }


def _num(x):
    return None if x is None or not np.isfinite(x) else float(x)


def precision_at_1(
    query_emb: np.ndarray, cand_emb: np.ndarray, rows: list[tuple[int, list[int]]]
) -> np.ndarray:
    """Each eval row's predicted candidate (position in its own list), as the official scorer:
    argmax of the inner products, the first one on a tie; correct when it is 0."""
    return np.array([int(np.argmax(cand_emb[c] @ query_emb[q])) for q, c in rows], np.int64)


# --- files --------------------------------------------------------------------------------------------


def write_outputs(out_dir, result: dict, rows: Rows) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "compare.json",
        "markdown": out / "compare.md",
        "plot": out / "compare.png",
        "rows": out / "rows.jsonl",
    }
    write_atomic(paths["json"], json.dumps(result, indent=2) + "\n")
    write_atomic(paths["markdown"], markdown(result))
    write_atomic(paths["rows"], rows.records())
    plots.cosine_histogram(rows.cosines(), paths["plot"], result.get("fail_below"))
    return paths


def _f(x, spec=".7f"):
    return "–" if x is None else format(x, spec)


def _cos(x):
    """A cosine with its distance from 1, which is what the digits near 1 hide."""
    return "–" if x is None else f"{x:.10f} (1 − cos = {1 - x:.1e})"


def _pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(r: dict) -> str:
    lines = [f"# g2e_jax vs {r['reference']} ({r['mode']} mode)", ""]
    if r["model"] is not None:
        lines += [f"Model: `{r['model']}`  ", f"Prompt: {r['prompt']}  "]
    lines += [f"Input: {r['input']}", ""]
    if r["rows"]:
        lines += ["| | official (PyTorch) | g2e_jax |", "|---|---|---|"]
        o, g = r["sides"]["official"], r["sides"]["g2e_jax"]
        for key, label in (("dtype", "dtype"), ("device", "device")):
            lines.append(f"| {label} | {o.get(key, '–')} | {g.get(key, '–')} |")
        lines.append(
            f"| rows/s ({r['rows']} rows) | {_f(o.get('rows_per_s'), '.2f')} | {_f(g.get('rows_per_s'), '.2f')} |"
        )
        if g.get("first_pass_rows_per_s") is not None and g.get("first_pass_rows_per_s") != g.get(
            "rows_per_s"
        ):
            lines.append(
                f"| rows/s, first pass | {_f(o.get('first_pass_rows_per_s'), '.2f')} | "
                f"{_f(g.get('first_pass_rows_per_s'), '.2f')} |"
            )
        headline = (
            f"**{r['rows']} rows: min cosine {_cos(r['min_cosine'])}, mean {_f(r['mean_cosine'], '.10f')}, "
            f"max abs difference {_f(r['max_abs_diff'], '.2e')}**"
        )
        lines += ["", headline, ""]
        if r.get("nan_rows"):
            lines += [f"{r['nan_rows']} rows have a non-finite cosine (a zero or non-finite embedding).", ""]
    if r["subsets"]:
        lines += [
            "| Subset | rows | min cosine | P@1 official | P@1 g2e_jax | top-1 disagreements |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, s in r["subsets"].items():
            q = s.get("queries")
            dis = "–" if s.get("top1_disagreements") is None else f"{s['top1_disagreements']} / {q}"
            lines.append(
                f"| {name} | {s['rows']} | {_cos(s['min_cosine'])} | {_pct(s.get('official_precision_at_1'))} | "
                f"{_pct(s.get('g2e_jax_precision_at_1'))} | {dis} |"
            )
        lines.append("")
        if any(s.get("official_score_json_acc") is not None for s in r["subsets"].values()):
            lines += [
                "Official P@1 is recomputed from the official embeddings; `{subset}_score.json` said: "
                + ", ".join(
                    f"{n} {_pct(s['official_score_json_acc'])}"
                    for n, s in r["subsets"].items()
                    if s.get("official_score_json_acc") is not None
                ),
                "",
            ]
    if r["worst"]:
        lines += [
            "Worst rows:",
            "",
            "| id | cosine | max abs diff | text | image |",
            "|---|---:|---:|---|---|",
        ]
        for w in r["worst"]:
            text = w["text"].replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| {w['id']} | {_cos(w['cosine'])} | {_f(w['max_abs_diff'], '.2e')} | {text} | "
                f"{w['image'] or ''} |"
            )
        lines.append("")
    if r.get("clusters"):
        lines += [
            "SaHa clusters (official `cli/sample_mmeb.py` vs `g2e-jax mine`):",
            "",
            "| Subset | official | g2e_jax | identical | same anchor | Jaccard (same anchor) | Jaccard (best match) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, c in r["clusters"].items():
            lines.append(
                f"| {name} | {c['official_clusters']} | {c['g2e_jax_clusters']} | {c['identical_clusters']} | "
                f"{c['same_anchor']} | {_f(c['mean_jaccard_same_anchor'], '.3f')} | "
                f"{_f(c['mean_best_jaccard'], '.3f')} |"
            )
        lines.append("")
    if r.get("fail_below") is not None:
        verdict = "PASS" if r["passed"] else f"FAIL: {r['failed_rows']} rows below"
        lines += [f"--fail-below {r['fail_below']}: **{verdict}**", ""]
    return "\n".join(lines)


