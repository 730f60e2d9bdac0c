"""Loads the weights a path names (a Hugging Face directory, a ``g2e-jax train`` workdir, or a base
directory plus a PEFT adapter) with an id that tells them apart in on-disk caches.

The id is cheap (file index, sizes and times; see ``g2e_jax.io.weights_fingerprint``) and changes
with anything that changes the weights: a trained step, an adapter's tensors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from g2e_jax.adapters.lora import merge_adapters
from g2e_jax.adapters.peft import WEIGHTS_FILE, load_peft_adapter
from g2e_jax.checkpoints import is_run_dir, load_trained
from g2e_jax.io import sha256_file, weights_fingerprint
from g2e_jax.models import load


def load_weights(
    path: str | Path, *, dtype: str = "auto", progress: bool = True, adapter: str | Path | None = None
):
    """(model, base model dir, weights id): ``path`` a Hugging Face model directory or a ``g2e-jax
    train`` workdir (base model + trained parameters, merged); ``adapter`` a PEFT LoRA/DoRA folder
    merged onto a base model directory."""
    if is_run_dir(path):
        if adapter is not None:
            raise ValueError(f"{path} is a training workdir; adapter= applies to a base model directory")
        return load_trained(path, dtype=dtype)
    model = load(path, dtype=dtype, progress=progress)
    if adapter is None:
        return model, Path(path), weights_fingerprint(path)
    load_peft_adapter(model, adapter)
    merge_adapters(model)
    weights_id = hashlib.sha256(
        f"{weights_fingerprint(path)}:peft:{sha256_file(Path(adapter) / WEIGHTS_FILE)}".encode()
    ).hexdigest()
    return model, Path(path), weights_id
