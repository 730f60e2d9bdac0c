"""The config sections every command shares, built in one place so that a flag such as
``--config.prompt.scheme`` or ``--config.model.adapter`` means the same thing in each.

The commands' own defaults (``eval_config``, ``embed_config``, ``training_config`` ...) compose
these with what is theirs; ``distributed_section`` lives with the code that reads it
(``g2e_jax.distributed``).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def model_section(*, dtype: str | None = "auto", adapter: bool = True) -> ml_collections.ConfigDict:
    """``model.path``: a local Hugging Face directory (the embedding jobs also take a ``g2e-jax train``
    workdir; required). ``model.dtype`` (omitted where ``dtype`` is None, for commands that load no
    weights): "auto" is bfloat16 on GPU/TPU and float32 on CPU, or name one. ``model.adapter``, where
    the command takes one: a PEFT LoRA/DoRA folder merged onto ``model.path``."""
    m = ml_collections.ConfigDict()
    m.path = config_dict.placeholder(str)
    if dtype is not None:
        m.dtype = dtype
    if adapter:
        m.adapter = config_dict.placeholder(str)
    return m


def prompt_section(preset: str = "hierarchical", *, systems: bool = True) -> ml_collections.ConfigDict:
    """``prompt.preset`` (a preset of ``g2e_jax.prompts.PRESETS``: "hierarchical", "plain", ...),
    ``prompt.scheme`` ("gen2embed", or "mrope" for Qwen's own M-RoPE positions) and, where the
    command renders whole templates, ``prompt.query_system`` / ``prompt.document_system`` (None: the
    preset's system prompts)."""
    p = ml_collections.ConfigDict()
    p.preset = preset
    p.scheme = "gen2embed"
    if systems:
        p.query_system = config_dict.placeholder(str)
        p.document_system = config_dict.placeholder(str)
    return p
