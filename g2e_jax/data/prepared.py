"""Prepared datasets: MMEB-format train rows preprocessed once into a TFDS ``array_record`` dataset.

Multi-host training then reads fixed records by random access, with no tokenisation and no image
decoding, each process only its share (``PreparedDataset.process_indices``). Written and read through
tensorflow-datasets without TensorFlow: ``tfds.core.SequentialWriter(..., file_format="array_record")``
to write, ``tfds.builder_from_directory(path).as_data_source("train")`` to read (numpy decoding;
``as_dataset`` would need TensorFlow).

Layout: ``output_dir`` is the TFDS dataset folder itself, plus our metadata::

    output_dir/dataset_info.json, features.json                          TFDS' own
    output_dir/g2e_jax_prepared-train.array_record-0000i                 ``shard_records`` records each
    output_dir/prepare_meta.json                                         prompt, scheme, max_len, model,
                                                                         image config, subsets and offsets

One split, ``train``: the subsets one after another in config order, rows in source order (TFDS
shuffling disabled), so record ``meta["subsets"][k]["offset"] + row`` is row ``row`` of subset ``k``
and a record's subset and row are known without reading it. Per record: ``subset``, ``row`` and, for
each side (``qry``, ``pos``), the user segment as ``Preprocessor.prepare`` makes it (``ids``, ``pos``,
``next_pos``, ``truncated_from``), the image as uint8 patches (``images.preprocess_uint8``: a quarter of
float32's bytes per frame and no temporal copy; ``expand_patches`` restores ``preprocess``' floats bit
for bit) with its ``grid``, and ``content_id``, a hash of the content used to mask false negatives.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from ml_collections import config_dict
from tqdm.auto import tqdm

from g2e_jax.data.images import ImageConfig, ImageError, _load_resized, _uint8_patches, expand_patches
from g2e_jax.data.mmeb import TrainRow, read_train
from g2e_jax.io import sha256_file, write_atomic
from g2e_jax.paths import absolute
from g2e_jax.preprocess import InputError, PreparedRow, Preprocessor

SIDES = ("qry", "pos")
SPLIT = "train"
META_FILE = "prepare_meta.json"
FORMAT = "g2e_jax.prepared"
FORMAT_VERSION = 1
BUILDER_NAME = "g2e_jax_prepared"
BUILDER_VERSION = "1.0.0"
_CHUNK = 16  # rows whose images are loaded together by the threads (bounds memory for large images)
_FIELDS = {"qry": ("qry", "qry_image"), "pos": ("pos_text", "pos_image")}
_BASE_ROLES = {"qry": "query", "pos": "document"}


class PrepareError(ValueError):
    """A source row that cannot be prepared; the message names the subset, the row and the side."""


def prepare_config() -> ml_collections.ConfigDict:
    """Defaults of ``run_prepare`` (override with ``--config.a.b=value``)."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    # The backbone's directory: only config.json, tokenizer.json and preprocessor_config.json are read.
    c.model.path = config_dict.placeholder(str)

    c.prompt = ml_collections.ConfigDict()
    c.prompt.preset = "hierarchical"  # or "plain": decides the role suffixes stored in the user segments
    c.prompt.scheme = "gen2embed"  # or "mrope" (stores M-RoPE positions)

    c.data = ml_collections.ConfigDict()
    c.data.root = config_dict.placeholder(str)  # MMEB-train: one folder per subset
    c.data.image_dir = config_dict.placeholder(str)  # image paths in the rows are relative to it
    c.data.split = "original"  # or "diverse_instruction"
    c.subsets = ()  # names under data.root, in the order they are stored
    c.data.check = True  # check every row and image first (g2e-jax check-data; cached)
    c.data.check_workers = 0  # threads opening images (0: one per CPU)
    c.data.check_cache = config_dict.placeholder(str)  # default: under ~/.cache/g2e_jax

    c.max_len = 1024
    c.image_resolution = config_dict.placeholder(str)  # low | clip | mid_low | mid | mid_high | high | random
    c.output_dir = config_dict.placeholder(str)  # the dataset folder (replaced if it is a prepared dataset)
    c.shard_records = 1024  # records per array_record file
    c.workers = 8  # threads decoding and resizing images
    return c


def content_id(text: str, image: str | None) -> int:
    """Stable 63-bit id of a (text, image path) content: equal contents get equal ids on any host."""
    digest = hashlib.sha256(json.dumps([text, image], ensure_ascii=False).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _features(patch_dim: int) -> tfds.features.FeaturesDict:
    tensor = tfds.features.Tensor
    spec = {"subset": tfds.features.Text(), "row": tfds.features.Scalar(np.int64)}
    for side in SIDES:
        spec.update({
            f"{side}_ids": tensor(shape=(None,), dtype=np.int32),
            f"{side}_pos": tensor(shape=(3, None), dtype=np.int32),
            f"{side}_next_pos": tfds.features.Scalar(np.int32),
            f"{side}_truncated_from": tfds.features.Scalar(np.int32),
            # Raw bytes: the default (an int64 varint list) would take ~1.5 bytes per pixel value.
            f"{side}_patches": tensor(shape=(None, patch_dim), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES),
            f"{side}_grid": tensor(shape=(3,), dtype=np.int32),
            f"{side}_content_id": tfds.features.Scalar(np.int64),
        })  # fmt: skip
    return tfds.features.FeaturesDict(spec)


def _rel_image(path: str | None, image_dir: Path | None) -> str | None:
    """The image as the source row names it (relative to image_dir), so ids survive moving the data."""
    if path is None or image_dir is None:
        return path
    try:
        return Path(path).relative_to(image_dir).as_posix()
    except ValueError:
        return path


def _check_cfg(cfg) -> tuple[Path, Path, list[str]]:
    missing = [k for k in ("model.path", "data.root", "output_dir") if _get(cfg, k) in (None, "")]
    if missing:
        raise ValueError(f"prepare: set {', '.join('--config.' + k for k in missing)}")
    subsets = list(cfg.subsets)
    if not subsets:
        raise ValueError("prepare: no subsets given (--config.subsets)")
    if len(set(subsets)) != len(subsets):
        raise ValueError(
            f"prepare: subsets listed twice: {sorted({s for s in subsets if subsets.count(s) > 1})}"
        )
    if int(cfg.shard_records) <= 0:
        raise ValueError(f"prepare: shard_records must be positive, got {cfg.shard_records}")
    return Path(cfg.model.path), Path(cfg.output_dir), subsets


def _get(cfg, dotted: str):
    for key in dotted.split("."):
        cfg = cfg[key]
    return cfg


class _SideLoader:
    """Preprocesses one side of a chunk of rows: images in threads, user segments with ``Preprocessor``."""

    def __init__(self, pp: Preprocessor, pool: ThreadPoolExecutor | None):
        self.pool = pool
        self.image_config = pp.image_config
        # Images reach `prepare` already at their final size, so the preprocessor that builds the token ids
        # must not resize them again: no pre-resize, and pixel bounds that keep any multiple of the factor
        # (smart_resize is then the identity and PIL's resize to the same size a copy). Same grid, same ids,
        # and each image is decoded and resized once.
        self.fast = copy.copy(pp)
        self.fast.image_config = dataclasses.replace(
            pp.image_config, resolution=None, min_pixels=1, max_pixels=2**62
        )

    def _image(self, path: str | None, where: str):
        if path is None:
            return None
        try:
            img = _load_resized(path, self.image_config, source=where)
        except ImageError as e:
            raise PrepareError(str(e)) from None
        return img, *_uint8_patches(img, self.image_config)

    def __call__(self, subset: str, start: int, rows: list[TrainRow], side: str, image_dir: Path | None):
        text_field, image_field = _FIELDS[side]
        texts = [getattr(r, text_field) for r in rows]
        paths = [getattr(r, image_field) for r in rows]
        wheres = [f"subset {subset!r} row {start + k}, {side} image" for k in range(len(rows))]
        loaded = list(
            self.pool.map(self._image, paths, wheres) if self.pool else map(self._image, paths, wheres)
        )
        patch_dim = 3 * self.image_config.patch_size**2
        out = []
        for k, (text, path, image) in enumerate(zip(texts, paths, loaded)):
            # One row per call: only one image's float32 patches (which prepare makes and we drop) at a time.
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message=r".*exceeded max_len="
                )  # counted per subset instead
                (p,) = self.fast.prepare(
                    [text], [None if image is None else image[0]], role=_BASE_ROLES[side], subset=subset,
                    errors="collect", progress=False,
                )  # fmt: skip
            if isinstance(p, InputError):
                raise PrepareError(f"subset {subset!r} row {start + k}, {side} {p.field}: {p.reason}")
            if image is None:
                patches, grid = np.zeros((0, patch_dim), np.uint8), np.zeros(3, np.int32)
            else:
                patches, grid = image[1], image[2]
                if not np.array_equal(grid, p.grid_thw):  # cannot happen: smart_resize keeps the size
                    raise AssertionError(f"subset {subset!r} row {start + k}: grid {grid} != {p.grid_thw}")
            pos = np.zeros((3, len(p.user_ids)), np.int32) if p.user_pos is None else p.user_pos
            out.append({
                f"{side}_ids": p.user_ids.astype(np.int32),
                f"{side}_pos": pos.astype(np.int32),
                f"{side}_next_pos": np.int32(p.next_pos),
                f"{side}_truncated_from": np.int32(p.truncated_from),
                f"{side}_patches": patches,
                f"{side}_grid": np.asarray(grid, np.int32),
                f"{side}_content_id": np.int64(content_id(text, _rel_image(path, image_dir))),
            })  # fmt: skip
        return out


def run_prepare(cfg) -> Path:
    """Writes the prepared dataset of ``cfg`` (see ``prepare_config``) and returns its folder."""
    model_dir, out, subsets = _check_cfg(cfg)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / META_FILE).is_file())):
        raise FileExistsError(f"{out}: exists and is not a prepared dataset; choose another output_dir")
    pp = Preprocessor.from_pretrained(
        model_dir, prompt=cfg.prompt.preset, scheme=cfg.prompt.scheme, max_len=cfg.max_len,
        image_resolution=cfg.image_resolution,
    )  # fmt: skip
    image_dir = None if cfg.data.image_dir is None else Path(absolute(cfg.data.image_dir))
    # Check and read every subset first: a bad row fails before hours of preprocessing.
    from g2e_jax.data.check import check_before_run

    check_before_run(cfg, "prepare", source="mmeb")
    sources, offset = [], 0
    for name in subsets:
        rows = read_train(cfg.data.root, name, cfg.data.split, image_dir=image_dir)
        roles = {side: pp.prompt.template_role(_BASE_ROLES[side], name) for side in SIDES}
        sources.append({"name": name, "offset": offset, "rows": rows, "roles": roles})
        offset += len(rows)
    total = offset
    if total == 0:
        raise ValueError(f"prepare: subsets {subsets} of {cfg.data.root} have no rows")
    patch_dim = 3 * pp.image_config.patch_size**2
    truncated = {s["name"]: {side: 0 for side in SIDES} for s in sources}

    workers = int(cfg.get("workers", 0) or 0)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="prepare") if workers > 1 else None
    load = _SideLoader(pp, pool)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bar = tqdm(total=total, desc="preparing rows", unit="row")
    try:
        info = tfds.core.DatasetInfo(
            builder=tfds.core.DatasetIdentity(
                name=BUILDER_NAME, version=tfds.core.Version(BUILDER_VERSION), data_dir=str(tmp),
                module_name=__name__,
            ),
            description=f"g2e_jax prepared MMEB-train ({cfg.data.split}): {', '.join(subsets)}",
            features=_features(patch_dim),
            disable_shuffling=True,  # records are in write order: index = subset offset + row
        )  # fmt: skip
        # SequentialWriter streams records into shards of exactly shard_records, in order. (A
        # GeneratorBasedBuilder would first copy every record through its shuffler's temporary files.)
        writer = tfds.core.SequentialWriter(
            ds_info=info, max_examples_per_shard=int(cfg.shard_records), file_format="array_record"
        )
        writer.initialize_splits([SPLIT])
        for src in sources:
            name, rows = src["name"], src["rows"]
            bar.set_postfix_str(name)
            for start in range(0, len(rows), _CHUNK):
                chunk = rows[start : start + _CHUNK]
                sides = [load(name, start, chunk, side, image_dir) for side in SIDES]
                records = []
                for k in range(len(chunk)):
                    record = {"subset": name, "row": np.int64(start + k)}
                    for side, values in zip(SIDES, sides):
                        record.update(values[k])
                        truncated[name][side] += bool(values[k][f"{side}_truncated_from"])
                    records.append(record)
                writer.add_examples({SPLIT: records})
                bar.update(len(chunk))
        writer.close_all()
        bar.close()
        meta = _meta(
            cfg, pp, model_dir, sources, truncated, total, info.splits[SPLIT].shard_lengths, patch_dim
        )
        write_atomic(tmp / META_FILE, json.dumps(meta, indent=2) + "\n")
        _replace_dir(tmp, out)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
    for name, counts in truncated.items():
        for side, n in counts.items():
            if n:
                warnings.warn(
                    f"subset {name!r}: {n} {side} rows exceeded max_len={cfg.max_len} and were truncated "
                    "inside their content",
                    stacklevel=2,
                )
    return out


def _replace_dir(new: Path, out: Path) -> None:
    """Renames ``new`` to ``out``: readers see the old dataset, briefly none, or the new one, never a mix."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _meta(
    cfg, pp: Preprocessor, model_dir: Path, sources, truncated, total, shard_lengths, patch_dim
) -> dict:
    files = {}
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
        if (model_dir / name).is_file():
            files[name] = sha256_file(model_dir / name)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "split": SPLIT,
        "num_records": total,
        "num_shards": len(shard_lengths),
        "shard_lengths": list(shard_lengths),
        "shard_records": int(cfg.shard_records),
        "model": {"path": absolute(model_dir), "sha256": files},
        "prompt": dataclasses.asdict(pp.prompt),
        "scheme": pp.prompt.scheme,
        "max_len": pp.max_len,
        "image_resolution": cfg.image_resolution,
        "image_config": dataclasses.asdict(pp.image_config),
        "patch_dim_uint8": patch_dim,
        "data": {
            "root": absolute(cfg.data.root),
            "image_dir": None if cfg.data.image_dir is None else absolute(cfg.data.image_dir),
            "split": cfg.data.split,
        },
        "subsets": [
            {
                "name": s["name"],
                "offset": s["offset"],
                "rows": len(s["rows"]),
                "roles": s["roles"],  # the template (system segment) each side is encoded with
                "truncated": truncated[s["name"]],
            }
            for s in sources
        ],
    }


class PreparedDataset:
    """Random access to a prepared dataset through TFDS' numpy data source (no TensorFlow)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_file = self.path / META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.path}: no {META_FILE}; not a prepared dataset (see run_prepare)")
        self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if self.meta.get("format") != FORMAT or self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.path}: format {self.meta.get('format')!r} version {self.meta.get('format_version')}, "
                f"expected {FORMAT!r} version {FORMAT_VERSION}"
            )
        self.image_config = ImageConfig(**self.meta["image_config"])
        self.scheme = self.meta["scheme"]
        self._subsets = {s["name"]: s for s in self.meta["subsets"]}
        self._offsets = np.array([s["offset"] for s in self.meta["subsets"]], np.int64)
        self.builder = tfds.builder_from_directory(os.fspath(self.path))
        self.source = self.builder.as_data_source(split=self.meta["split"])
        if len(self.source) != self.meta["num_records"]:
            raise ValueError(
                f"{self.path}: {len(self.source)} records, but {META_FILE} says {self.meta['num_records']}"
            )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range for {n} records")
        return self._decode(self.source[i % n])

    def __getitems__(self, indices) -> list[dict]:
        """Several records in one call (array_record reads them with threads: pays off on remote storage,
        not on a local disk, where indexing one by one was faster)."""
        return [self._decode(r) for r in self.source.__getitems__([int(i) for i in indices])]

    @staticmethod
    def _decode(record: dict) -> dict:
        out = {}
        for key, value in record.items():
            if isinstance(value, bytes):
                out[key] = value.decode("utf-8")
            elif isinstance(value, np.ndarray):
                out[key] = value
            else:
                out[key] = (
                    np.int64(value) if key in ("row",) or key.endswith("_content_id") else np.int32(value)
                )
        return out

    @property
    def subsets(self) -> list[str]:
        return list(self._subsets)

    def index(self, subset: str, row: int) -> int:
        """Record index of ``row`` of ``subset`` (no read)."""
        if subset not in self._subsets:
            raise KeyError(f"{self.path}: no subset {subset!r}; has {', '.join(self._subsets)}")
        s = self._subsets[subset]
        if not 0 <= row < s["rows"]:
            raise IndexError(f"subset {subset!r} has {s['rows']} rows, no row {row}")
        return s["offset"] + int(row)

    def locate(self, i: int) -> tuple[str, int]:
        """(subset, row) of record ``i`` (no read)."""
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records")
        s = self.meta["subsets"][int(np.searchsorted(self._offsets, i, side="right")) - 1]
        return s["name"], int(i) - s["offset"]

    def role(self, subset: str, side: str) -> str:
        """The template a side of ``subset`` is encoded with (Matching subsets' positives use "query")."""
        return self._subsets[subset]["roles"][side]

    def prepared_row(self, i_or_record: int | dict, side: str) -> PreparedRow:
        """One side of a record as ``Preprocessor.prepare`` returns it (float32 patches), for
        ``Embedder.encode_prepared``. Pass a record from ``self[i]`` to avoid reading it twice."""
        if side not in SIDES:
            raise ValueError(f"unknown side {side!r}; expected one of {SIDES}")
        r = self[i_or_record] if not isinstance(i_or_record, dict) else i_or_record
        grid = r[f"{side}_grid"]
        has_image = bool(grid.any())
        return PreparedRow(
            user_ids=r[f"{side}_ids"],
            user_pos=r[f"{side}_pos"] if self.scheme == "mrope" else None,
            next_pos=int(r[f"{side}_next_pos"]),
            patches=expand_patches(r[f"{side}_patches"], self.image_config) if has_image else None,
            grid_thw=grid.astype(np.int64) if has_image else None,
            truncated_from=int(r[f"{side}_truncated_from"]),
        )

    def process_indices(self, process_index: int, process_count: int) -> np.ndarray:
        """This process's contiguous share of record indices; shares differ by at most one record and
        together cover every record once."""
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
        n = len(self)
        lo, hi = n * process_index // process_count, n * (process_index + 1) // process_count
        return np.arange(lo, hi, dtype=np.int64)
