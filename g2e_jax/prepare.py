"""``g2e-jax prepare``: MMEB-format train rows -> the prepared dataset of ``g2e_jax.data.prepared``.

Every row is checked first (``g2e_jax.check_data``), then tokenised and patchified once (images
decoded and resized by threads) and streamed into ``array_record`` shards; the folder appears whole
or not at all (written under a temporary name, then renamed).
"""

from __future__ import annotations

import dataclasses
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

from g2e_jax.check_data import check_before_run
from g2e_jax.config_sections import data_section, model_section, prompt_section
from g2e_jax.data import prepared
from g2e_jax.data.images import ImageError
from g2e_jax.data.mmeb import TrainRow, read_train
from g2e_jax.data.prepared import (
    BUILDER_NAME,
    BUILDER_VERSION,
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    SIDES,
    SPLIT,
    content_id,
    features,
)
from g2e_jax.io import sha256_file, write_atomic
from g2e_jax.paths import absolute
from g2e_jax.preprocess import InputError, Preprocessor

_CHUNK = 16  # rows whose images are loaded together by the threads (bounds memory for large images)
_FIELDS = {"qry": ("qry", "qry_image"), "pos": ("pos_text", "pos_image")}
_BASE_ROLES = {"qry": "query", "pos": "document"}

class PrepareError(ValueError):
    """A source row that cannot be prepared; the message names the subset, the row and the side."""


def prepare_config() -> ml_collections.ConfigDict:
    """Defaults of ``run_prepare`` (override with ``--config.a.b=value``)."""
    c = ml_collections.ConfigDict()
    # The backbone's directory: only config.json, tokenizer.json and preprocessor_config.json are read.
    c.model = model_section(dtype=None, adapter=False)
    # The preset decides the role suffixes stored in the user segments; "mrope" stores M-RoPE positions.
    c.prompt = prompt_section(systems=False)

    c.data = data_section("root", "image_dir", "split", "check", "check_workers", "check_cache")  # MMEB-train
    c.subsets = ()  # names under data.root, in the order they are stored

    c.max_len = 1024
    c.image_resolution = config_dict.placeholder(str)  # low | clip | mid_low | mid | mid_high | high | random
    c.output_dir = config_dict.placeholder(str)  # the dataset folder (replaced if it is a prepared dataset)
    c.shard_records = 1024  # records per array_record file
    c.workers = 8  # threads decoding and resizing images
    return c

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
    """Preprocesses one side of a chunk of rows: images in threads (the backbone's ``images.store``, its
    image processor stopped before rescale/normalise), user segments with ``Preprocessor``."""

    def __init__(self, pp: Preprocessor, pool: ThreadPoolExecutor | None):
        self.pp = pp
        self.pool = pool
        self.images = pp.backbone.images

    def _image(self, path: str | None, where: str):
        if path is None:
            return None
        try:
            return self.images.store(path, self.pp.image_config, source=where)
        except ImageError as e:
            raise PrepareError(str(e)) from None

    def __call__(self, subset: str, start: int, rows: list[TrainRow], side: str, image_dir: Path | None):
        text_field, image_field = _FIELDS[side]
        texts = [getattr(r, text_field) for r in rows]
        paths = [getattr(r, image_field) for r in rows]
        wheres = [f"subset {subset!r} row {start + k}, {side} image" for k in range(len(rows))]
        loaded = list(
            self.pool.map(self._image, paths, wheres) if self.pool else map(self._image, paths, wheres)
        )
        patch_dim = self.images.stored_dim(self.pp.image_config)
        role = self.pp.prompt.template_role(_BASE_ROLES[side], subset)
        system_len = len(self.pp.system_ids(role))
        out = []
        for k, (text, path, image) in enumerate(zip(texts, paths, loaded)):
            # The stored rows stand in for the float ones: the row's ids need only the image's geometry,
            # and each image is decoded and resized once. (Over-long rows are counted per subset.)
            try:
                p = self.pp._prepare_row(start + k, text, path, role, None, system_len, features=image)
            except InputError as e:
                raise PrepareError(f"subset {subset!r} row {start + k}, {side} {e.field}: {e.reason}") from None
            if image is None:
                patches, grid = np.zeros((0, patch_dim), np.uint8), np.zeros(3, np.int32)
            else:
                patches, grid = image
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
    patch_dim = pp.backbone.images.stored_dim(pp.image_config)
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
                module_name=prepared.__name__,  # the format's module, as before the split
            ),
            description=f"g2e_jax prepared MMEB-train ({cfg.data.split}): {', '.join(subsets)}",
            features=features(patch_dim),
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
        "model_type": pp.config.model_type,  # whose image processor made the stored rows (and ids)
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
        "image_config": dataclasses.asdict(pp.image_config),  # the backbone's images.settings
        "patch_dim_uint8": patch_dim,  # width of a stored uint8 row (Qwen: a patch; LLaVA-NeXT: a tile)
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
