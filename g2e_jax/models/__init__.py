"""Backbones, one table entry per Hugging Face ``model_type``; ``load``, ``save``, ``read_config``
and ``make_tiny`` dispatch on it, so every command works unchanged for each.

Adding a model: a folder under ``models/`` that adds only what differs (its config, vision part, name map,
tiny config and files, chat format, image processor, bundled in a ``Backbone``), reusing ``models/common/``
(the text decoder, layers, config readers, checkpoint rule groups, the tiny tokenizer, image-processor
arithmetic; see ``llava_next``), or its family's parts (``qwen2_5_vl`` reuses Qwen2-VL's); and its
``BACKBONE`` in the table below.
"""

from __future__ import annotations

from pathlib import Path

from g2e_jax.models import llava_next, qwen2_5_vl, qwen2_vl, qwen3_vl, tiny
from g2e_jax.models.backbone import Backbone
from g2e_jax.models.common.config import read_hf_config

BACKBONES: dict[str, Backbone] = {
    b.model_type: b for b in (qwen2_vl.BACKBONE, qwen2_5_vl.BACKBONE, llava_next.BACKBONE, qwen3_vl.BACKBONE)
}
SUPPORTED_MODEL_TYPES = tuple(BACKBONES)


def backbone_of(model_type: str | None, source: str = "model_type") -> Backbone:
    """The table entry of a ``model_type`` (``source`` names where it was read, for the error)."""
    if model_type not in BACKBONES:
        raise ValueError(
            f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return BACKBONES[model_type]


def read_config(path: str | Path):
    """The config of a local Hugging Face model directory, of its backbone's config class."""
    d, source = read_hf_config(path)
    return backbone_of(d.get("model_type"), source).config.from_hf_dict(d, source)


def load(
    path: str | Path, dtype: str = "float32", *, compute_dtype: str | None = None, progress: bool = True
):
    """Loads a local Hugging Face directory of any supported backbone (see ``Backbone.load``)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (expected a local Hugging Face model directory)")
    d, source = read_hf_config(path)
    return backbone_of(d.get("model_type"), source).load(
        path, dtype, compute_dtype=compute_dtype, progress=progress
    )


def save(model, path: str | Path, **kwargs) -> None:
    """Writes ``model`` in Hugging Face layout (see ``Backbone.save``)."""
    backbone_of(model.config.model_type).save(model, path, **kwargs)


def make_tiny(output: str | Path, *, arch: str = "qwen2_vl", seed: int = 0, config=None) -> Path:
    """A tiny random model of ``arch`` (a model_type) in Hugging Face layout, with tokenizer files."""
    return tiny.make_tiny(backbone_of(arch, "arch"), output, seed=seed, config=config)


__all__ = ["BACKBONES", "SUPPORTED_MODEL_TYPES", "Backbone", "backbone_of", "load", "make_tiny", "read_config",
           "save"]  # fmt: skip
