"""Small file helpers shared by every writer: atomic writes and cheap fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write under a temporary name in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_fingerprint(model_dir: str | Path) -> str:
    """Hash of the weights' index (tensor names, shapes, dtypes and offsets), file sizes and
    modification times: cheap for a 7B checkpoint. The index alone is the same for every checkpoint of
    one architecture (a fine-tuned export and its base model), so the times tell rewritten files apart."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    for name in files:
        file = model_dir / name
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            stat = file.stat()
            digest.update(name.encode() + f.read(header_len) + f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()
