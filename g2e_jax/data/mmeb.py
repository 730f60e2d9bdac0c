"""MMEB train and eval readers over local files, through `datasets`.

A subset lives under ``root/<subset>/`` as parquet or jsonl files named after the split
(``original-00000-of-00001.parquet``, ``test.jsonl``, ...) or as a ``save_to_disk`` folder; images
are paths relative to ``image_dir`` ("" means no image; without ``image_dir``, relative to the subset's
folder, which holds the rows). Rows come back with absolute image paths (or None), and every problem
names the subset, the row and the file or path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import datasets
import numpy as np

from g2e_jax.paths import resolve_in

TRAIN_SPLITS = ("original", "diverse_instruction")
TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
TRAIN_OPTIONAL = ("neg_text", "neg_image_path")
EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")


@dataclasses.dataclass(frozen=True)
class TrainRow:
    qry: str
    qry_image: str | None
    pos_text: str
    pos_image: str | None
    neg_text: str = ""
    neg_image: str | None = None
    # Where the row came from (for error messages and skipped.jsonl): the file and its 1-based line
    # (JSONL) or record number (parquet, save_to_disk folders).
    file: str | None = dataclasses.field(default=None, compare=False)
    line: int = dataclasses.field(default=0, compare=False)


@dataclasses.dataclass(frozen=True)
class EvalRow:
    qry_text: str
    qry_image: str | None
    tgt_texts: tuple[str, ...]  # index 0 is the correct candidate
    tgt_images: tuple[str | None, ...]


class DataError(ValueError):
    pass


def available_subsets(root: str | Path) -> list[str]:
    root = Path(root)
    return (
        sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if root.is_dir()
        else []
    )


def load_split(root: str | Path, subset: str, split: str) -> tuple[datasets.Dataset, str]:
    """The split as a `datasets.Dataset`, and a description of where it came from (for errors)."""
    root = Path(root)
    folder = root / subset
    if not folder.is_dir():
        raise DataError(
            f"{root}: no subset {subset!r}; available: {', '.join(available_subsets(root)) or 'none'}"
        )
    builder, files = split_files(folder, split)
    if files:
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        except Exception as e:  # noqa: BLE001 - pyarrow/datasets errors say little about the line
            cause = e.__cause__ or e
            raise DataError(
                f"subset {subset!r}: cannot read {', '.join(str(f) for f in files)} "
                f"({type(cause).__name__}: {cause}); `g2e-jax check-data` lists every bad line"
            ) from None
        return ds, ", ".join(str(f) for f in files)
    disk = folder / split
    if (disk / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(disk)), str(disk)
    if (folder / "dataset_dict.json").is_file():
        dd = datasets.load_from_disk(str(folder))
        if split in dd:
            return dd[split], f"{folder}[{split}]"
    present = sorted(p.name for p in folder.iterdir())
    raise DataError(f"{folder}: no split {split!r} (looked for {split}.parquet|jsonl, {split}-*.parquet|jsonl, "
                    f"or a save_to_disk folder); found: {', '.join(present) or 'nothing'}")  # fmt: skip


def split_files(folder: Path, split: str) -> tuple[str | None, list[Path]]:
    """(datasets builder, files) of a split stored as parquet or JSON lines files; (None, []) if none."""
    for pattern, builder in (("parquet", "parquet"), ("jsonl", "json"), ("json", "json")):
        files = sorted(folder.glob(f"{split}.{pattern}")) + sorted(folder.glob(f"{split}-*.{pattern}"))
        if files:
            return builder, files
    return None, []


def row_origins(root, subset: str, split: str, count: int) -> list[tuple[str, int]]:
    """(file, 1-based line or record number) of each of the split's ``count`` rows, in reading order:
    JSON lines files count their lines (blank ones are not rows), parquet files their records."""
    folder = Path(root) / subset
    builder, files = split_files(folder, split)
    if not files:  # a save_to_disk folder: the record number within it
        where = str((folder / split) if (folder / split).is_dir() else folder)
        return [(where, i + 1) for i in range(count)]
    out = []
    for f in files:
        name = str(f.absolute())
        if builder == "parquet":
            import pyarrow.parquet as pq

            out += [(name, i + 1) for i in range(pq.ParquetFile(f).metadata.num_rows)]
        else:
            with open(f, "rb") as fh:
                out += [(name, n) for n, line in enumerate(fh, start=1) if line.strip()]
    if len(out) != count:  # not expected; never attach wrong lines
        return [(", ".join(str(f) for f in files), i + 1) for i in range(count)]
    return out


def _check_columns(ds: datasets.Dataset, required, subset: str, where: str) -> None:
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise DataError(f"subset {subset!r} ({where}): missing column(s) {missing}; has {ds.column_names}")


def _image(image_dir: Path, value, subset: str, row: int, column: str, where: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(
            f"subset {subset!r} row {row} ({where}), column {column!r}: expected a path, got {value!r}"
        )
    path = resolve_in(image_dir, value)
    if not _is_file(path):
        raise DataError(
            f"subset {subset!r} row {row} ({where}), column {column!r}: image not found: {path} "
            "(MMEB rows name images relative to data.image_dir)"
        )
    return path


def _image_path(image_dir: Path | None, value, subset: str, row: int, column: str, where: str) -> str | None:
    """As ``_image``, without looking at the file."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(
            f"subset {subset!r} row {row} ({where}), column {column!r}: expected a path, got {value!r}"
        )
    return resolve_in(image_dir, value)


_KNOWN_FILES: set[str] = set()


def _is_file(path: str) -> bool:
    # MMEB-eval repeats each candidate image across many rows: stat each existing path once.
    if path in _KNOWN_FILES:
        return True
    if Path(path).is_file():
        _KNOWN_FILES.add(path)
        return True
    return False


def _text(value, subset: str, row: int, column: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"subset {subset!r} row {row} ({where}), column {column!r}: expected text, got {value!r}"
        )
    return value


# The official in-batch training's per-subset sample: ``subset.shuffle(seed=42).select(range(n))``.
SAMPLE_SEED = 42


def sample_rows(num_rows: int, limit: int | None, seed: int = SAMPLE_SEED) -> np.ndarray:
    """Row indices of a subset capped at ``limit`` rows, as the official training takes them.

    The official code keeps a subset whole when it has at most ``num_sample_per_subset`` rows, and
    otherwise takes ``Dataset.shuffle(seed=42).select(range(n))``. Hugging Face ``datasets`` shuffles
    with ``np.random.default_rng(seed).permutation(len(dataset))``, so this returns exactly the rows it
    selects, in its order, for the same rows in the same order (the same parquet files):
    tests/test_recipe.py checks it against ``datasets`` itself. ``limit=None``: every row, in order.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"num_sample_per_subset must be >= 1 or None, got {limit}")
    if limit is None or num_rows <= limit:
        return np.arange(num_rows, dtype=np.int64)
    return np.random.default_rng(seed).permutation(num_rows)[:limit].astype(np.int64)


def read_train(
    root, subset: str, split: str = "original", *, image_dir=None, num_samples: int | None = None,
    check_images: bool = True,
) -> list[TrainRow]:
    """The rows of one MMEB-train subset; ``num_samples`` caps them as the official in-batch training
    does (``sample_rows``; only the kept rows are read and checked). Row numbers in errors are
    those of the file. ``check_images=False`` leaves a missing image to be found when the row
    is used (training's ``data.bad_rows="skip"`` then drops just that row)."""
    if split not in TRAIN_SPLITS:
        raise DataError(f"unknown MMEB-train split {split!r}; expected one of {TRAIN_SPLITS}")
    ds, where = load_split(root, subset, split)
    _check_columns(ds, TRAIN_COLUMNS, subset, where)
    image_dir = Path(root) / subset if image_dir is None else Path(image_dir)
    origins = row_origins(root, subset, split, len(ds))
    image = _image if check_images else _image_path
    keep = sample_rows(len(ds), num_samples)
    if len(keep) < len(ds):
        ds = ds.select(keep)
    rows = []
    for i, r in zip(keep.tolist(), ds):
        where = f"{origins[i][0]} line {origins[i][1]}"
        rows.append(TrainRow(
            qry=_text(r["qry"], subset, i, "qry", where),
            qry_image=image(image_dir, r["qry_image_path"], subset, i, "qry_image_path", where),
            pos_text=_text(r["pos_text"], subset, i, "pos_text", where),
            pos_image=image(image_dir, r["pos_image_path"], subset, i, "pos_image_path", where),
            neg_text=_text(r.get("neg_text"), subset, i, "neg_text", where),
            neg_image=image(image_dir, r.get("neg_image_path"), subset, i, "neg_image_path", where),
            file=origins[i][0], line=origins[i][1],
        ))  # fmt: skip
    return rows


def read_eval(root, subset: str, *, image_dir=None, split: str = "test") -> list[EvalRow]:
    ds, where = load_split(root, subset, split)
    _check_columns(ds, EVAL_COLUMNS, subset, where)
    image_dir = Path(root) / subset if image_dir is None else Path(image_dir)
    rows = []
    for i, r in enumerate(ds):
        texts, images = r["tgt_text"], r["tgt_img_path"]
        if not isinstance(texts, list) or not isinstance(images, list):
            raise DataError(f"subset {subset!r} row {i} ({where}): tgt_text and tgt_img_path must be lists")
        if len(texts) != len(images) or not texts:
            raise DataError(f"subset {subset!r} row {i} ({where}): {len(texts)} tgt_text but {len(images)} "
                            "tgt_img_path (need the same, non-zero number)")  # fmt: skip
        rows.append(EvalRow(
            qry_text=_text(r["qry_text"], subset, i, "qry_text", where),
            qry_image=_image(image_dir, r["qry_img_path"], subset, i, "qry_img_path", where),
            tgt_texts=tuple(_text(t, subset, i, "tgt_text", where) for t in texts),
            tgt_images=tuple(_image(image_dir, p, subset, i, "tgt_img_path", where) for p in images),
        ))  # fmt: skip
    return rows
