"""The prepared-dataset format: MMEB-format train rows preprocessed once into a TFDS ``array_record``
dataset, and its reader (the ``prepare`` command that writes it is ``g2e_jax.prepare``).

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
``next_pos``, ``truncated_from``), the image as its backbone's image processor makes it but stopped
before rescale/normalise (``Backbone.images.store``: uint8 rows, a quarter of float32's bytes; Qwen2-VL
family: patches of one frame, no temporal copy; LLaVA-NeXT: anyres tiles) with its geometry ``grid``
(``grid_thw``; the anyres layout), and ``content_id``, a hash of the content used to mask false
negatives. The metadata names the backbone (``model_type``) and its image settings (``image_config``).
The reader gives the rows as stored: the image processor above expands them
(``g2e_jax.preprocess.PreparedInputs``: ``images.expand`` with the metadata's settings restores
``preprocess``' floats bit for bit).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from g2e_jax.data.rows import PreparedRow

SIDES = ("qry", "pos")
SPLIT = "train"
META_FILE = "prepare_meta.json"
FORMAT = "g2e_jax.prepared"
# 2: the metadata names the backbone (``model_type``) whose image processor made the stored rows, which
# may be another's than Qwen2-VL's patches (LLaVA-NeXT: anyres tiles). Version 1 datasets name none and
# hold Qwen2-VL-family patches; they are read as such (``LEGACY_MODEL_TYPE``), their records unchanged.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
LEGACY_MODEL_TYPE = "qwen2_vl"
BUILDER_NAME = "g2e_jax_prepared"
BUILDER_VERSION = "1.0.0"
def content_id(text: str, image: str | None) -> int:
    """Stable 63-bit id of a (text, image path) content: equal contents get equal ids on any host."""
    digest = hashlib.sha256(json.dumps([text, image], ensure_ascii=False).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1

def features(patch_dim: int) -> tfds.features.FeaturesDict:
    """The records' TFDS features (written by ``g2e_jax.prepare``)."""
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

class PreparedDataset:
    """Random access to a prepared dataset through TFDS' numpy data source (no TensorFlow)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_file = self.path / META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.path}: no {META_FILE}; not a prepared dataset (write one with `g2e-jax prepare`)")
        self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        version = self.meta.get("format_version")
        if self.meta.get("format") != FORMAT or version not in READABLE_VERSIONS:
            raise ValueError(
                f"{self.path}: format {self.meta.get('format')!r} version {version}, "
                f"expected {FORMAT!r} version {' or '.join(map(str, READABLE_VERSIONS))}"
            )
        if (version == 1) != ("model_type" not in self.meta):
            raise ValueError(f"{self.path}: {META_FILE} of version {version} must "
                             f"{'not ' if version == 1 else ''}name a model_type")  # fmt: skip
        # The backbone whose image processor made the stored rows (and whose tokenizer the ids).
        self.model_type: str = self.meta.get("model_type", LEGACY_MODEL_TYPE)
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
        """One side of a record as ``Preprocessor.prepare`` returns it, but for its patches: uint8
        ``[N, C*P*P]`` as stored (``g2e_jax.preprocess.PreparedInputs`` expands them). Pass a record from
        ``self[i]`` to avoid reading it twice."""
        if side not in SIDES:
            raise ValueError(f"unknown side {side!r}; expected one of {SIDES}")
        r = self[i_or_record] if not isinstance(i_or_record, dict) else i_or_record
        grid = r[f"{side}_grid"]
        has_image = bool(grid.any())
        return PreparedRow(
            user_ids=r[f"{side}_ids"],
            user_pos=r[f"{side}_pos"] if self.scheme == "mrope" else None,
            next_pos=int(r[f"{side}_next_pos"]),
            patches=r[f"{side}_patches"] if has_image else None,
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
