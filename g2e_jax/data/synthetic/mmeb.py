"""A tiny offline stand-in for MMEB: PIL-drawn shape scenes written in MMEB's train/eval formats.

The demo and the tests need MMEB-shaped data without a network or gigabytes of images, and they need
it reproducible: everything is drawn from ``numpy.random.default_rng`` streams keyed by the seed (one
stream per subset, so subsets do not shift each other), and PNGs are written with fixed options, so a
seed gives byte-identical files. Eight subsets cover MMEB's four categories, each with an IND and an
OOD member::

    output/images/<Subset>/*.png
    output/train/<Subset>/original.jsonl             qry, qry_image_path, pos_text, pos_image_path,
    output/train/<Subset>/diverse_instruction.jsonl      neg_text, neg_image_path
    output/eval/<Subset>/test.jsonl                  qry_text, qry_img_path, tgt_text[], tgt_img_path[]
    output/groups.json                               {"<Subset>": {"category": ..., "split": "IND"|"OOD"}}
    output/README.md

Image paths in rows are relative to ``output/images``; "" means no image. In eval rows candidate 0 is
the correct one. ``generate_synthetic`` returns the same files in memory together with the ground
truth of every image (the scene it shows), which the rows do not carry, so tests can check labels.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from g2e_jax.data.synthetic.mmeb_subsets import BUILDERS, SUBSETS, TEMPLATES, Subset
from g2e_jax.data.synthetic.shapes import COLORS, CROP_SIZE, SHAPES, Crop, Scene

MIN_IMAGE_SIZE = 48

_DESCRIPTIONS = {
    "SynShape": "one shape on a plain background; the label is its shape name.",
    "SynColor": "one shape on a plain background; the label is its colour name.",
    "SynColorVQA": "1-3 shapes of different kinds; the question asks the colour of one of them.",
    "SynCountVQA": "1-4 shapes; the question asks how many there are (answers one..four).",
    "SynT2I": "a caption naming two coloured shapes retrieves the scene; hard negatives swap the colours.",
    "SynI2T": "a two-shape scene retrieves its caption; hard negatives swap the colours.",
    "SynGround": (
        "a 3-4 shape scene and an object label retrieve the 56x56 crop of that object; candidates are the "
        "scene's other objects first, then crops from other scenes."
    ),
    "SynGround-Matching": (
        "a 56x56 object crop retrieves its label; candidates are the labels of the scene's other objects, "
        "then other labels (texts only, so they are encoded with the query template)."
    ),
}


@dataclasses.dataclass
class SyntheticData:
    """The dataset in memory: ``files`` (path under output -> bytes) and ``truth`` (image path -> content)."""

    files: dict[str, bytes]
    truth: dict[str, Scene | Crop]


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def generate_synthetic(
    *,
    seed: int = 0,
    train_rows: int = 64,
    eval_queries: int = 24,
    num_candidates: int = 8,
    image_size: int = 84,
) -> SyntheticData:
    """Builds every file in memory (see the module docstring); ``make_synthetic`` writes them."""
    seed = _check_int("seed", seed, 0)
    args = (
        _check_int("train_rows", train_rows, 1),
        _check_int("eval_queries", eval_queries, 1),
        _check_int("num_candidates", num_candidates, 2),
    )
    size = _check_int("image_size", image_size, MIN_IMAGE_SIZE)
    files: dict[str, bytes] = {}
    truth: dict[str, Scene | Crop] = {}
    counts = {}
    for name in SUBSETS:
        sub = Subset(name, seed, size)
        BUILDERS[name](sub, *args)
        files.update(sub.files())
        truth.update(sub.truth)
        counts[name] = (len(sub.train), len(sub.eval), len(sub.eval[0]["tgt_text"]), len(sub.images))
    groups = {name: {"category": cat, "split": split} for name, (cat, split) in SUBSETS.items()}
    files["groups.json"] = (json.dumps(groups, indent=2) + "\n").encode("utf-8")
    files["README.md"] = _readme(seed, size, counts, files).encode("utf-8")
    return SyntheticData(files=files, truth=truth)


def make_synthetic(output: str | Path, **options) -> Path:
    """Writes the synthetic MMEB-format dataset under ``output`` and returns its path; ``options`` are
    ``generate_synthetic``'s (seed, train_rows, eval_queries, num_candidates, image_size).

    An existing synthetic dataset there (recognised by its groups.json) has its subset folders replaced, so
    no stale file survives; any other non-empty folder is refused rather than written into.
    """
    data = generate_synthetic(**options)
    out = Path(output)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out}: exists and is not a directory")
        if any(out.iterdir()):
            if not _is_synthetic(out):
                raise FileExistsError(f"{out}: not empty and not a synthetic dataset; choose another output")
            for name in SUBSETS:
                for part in ("images", "train", "eval"):
                    if (out / part / name).is_dir():
                        shutil.rmtree(out / part / name)
    for rel, content in sorted(data.files.items()):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return out


def _is_synthetic(out: Path) -> bool:
    try:
        groups = json.loads((out / "groups.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(groups, dict) and set(groups) == set(SUBSETS)


def _readme(seed: int, size: int, counts: dict, files: dict[str, bytes]) -> str:
    total = sum(len(b) for b in files.values())
    lines = [
        "# Synthetic MMEB-format dataset",
        "",
        "Written by `g2e_jax.data.synthetic.make_synthetic` (offline, deterministic from the seed) as a small",
        "stand-in for MMEB: PIL-drawn shapes (" + ", ".join(SHAPES) + ") in " + ", ".join(COLORS) + ",",
        f"on plain light backgrounds. seed={seed}, image_size={size}, crops {CROP_SIZE}x{CROP_SIZE};",
        f"{total / 1e6:.2f} MB of images and rows (this README aside).",
        "",
        "Layout: `images/<Subset>/*.png`; `train/<Subset>/original.jsonl` and `diverse_instruction.jsonl`",
        "(MMEB-train rows: qry, qry_image_path, pos_text, pos_image_path, neg_text, neg_image_path; the",
        "diverse file paraphrases the query instruction); `eval/<Subset>/test.jsonl` (MMEB-eval rows:",
        "qry_text, qry_img_path, tgt_text, tgt_img_path; candidate 0 is the correct one); `groups.json`.",
        'Image paths are relative to `images/`; "" means no image. Half the train rows carry a hard negative.',
        "",
        "| Subset | Category | Split | Train rows | Eval queries | Candidates | Images | Task |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (cat, split) in SUBSETS.items():
        n_train, n_eval, n_cand, n_img = counts[name]
        lines.append(
            f"| {name} | {cat} | {split} | {n_train} | {n_eval} | {n_cand} | {n_img} | {_DESCRIPTIONS[name]} |"
        )
    lines += ["", "Query instructions (MMEB wording):", ""]
    lines += [f"- {name}: `{TEMPLATES[name][0]}`" for name in SUBSETS]
    return "\n".join(lines) + "\n"
