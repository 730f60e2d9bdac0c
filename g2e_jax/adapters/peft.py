"""PEFT LoRA / DoRA adapter folders in and out (``adapter_config.json`` + ``adapter_model.safetensors``).

Key names are PEFT's for a transformers model: ``base_model.model.<module>.lora_A.weight`` ``[r, in]``,
``.lora_B.weight`` ``[out, r]`` and, for DoRA, ``.lora_magnitude_vector`` ``[out]``, where ``<module>``
is the transformers 5 in-memory name (``model.language_model.layers.0.self_attn.q_proj``); the hub
names of transformers 4 (``model.layers.0...``, what the official Gen2Embed adapters hold) are read too.
The backbone's ``NameMap`` translates module names, so any linear layer it maps can carry an adapter.
Names are per layer on both sides; a stacked adapter (``lora_a [L, in, r]``, see ``adapters.lora``)
is written one layer's slice per key and read back into its slices, bit for bit.
Settings our layers do not compute (rsLoRA, adapter biases, ``modules_to_save``, per-module ranks,
other PEFT types) are refused with the offending field named, never silently dropped.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2e_jax.adapters.lora import AdapterConfig, adapter_layers, apply_adapters
from g2e_jax.io import write_atomic
from g2e_jax.models.name_map import TRANSPOSE

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
SUFFIXES = {".lora_A.weight": "lora_a", ".lora_B.weight": "lora_b", ".lora_magnitude_vector": "magnitude"}

# adapter_config.json fields that change what a layer computes and that we do not implement, with the
# value(s) meaning "off".
_UNSUPPORTED = {
    "use_rslora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "fan_in_fan_out": (False, None),
    "layer_replication": (None, []),
    "use_qalora": (False, None),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}, []),
    "alora_invocation_tokens": (None, []),
    "use_bdlora": (None, False),
}


def _name_map(model):
    from g2e_jax.models import backbone_of

    return backbone_of(model.config.model_type).name_map


def _module_path(name_map, module: str, source: str) -> str:
    """A transformers module name (5.x in-memory or hub spelling) -> our module path."""
    found = name_map.to_nnx(module + ".weight")
    if found is None or found.rule.transform is not TRANSPOSE or not found.path.endswith(".kernel"):
        raise ValueError(f"{source}: adapter on {module!r}, which is not a linear layer of this model")
    # The per-layer path (a layer of a stack: the rule's template with its index).
    path = found.path if found.layer is None else found.rule.nnx.format(i=found.layer)
    return path.removesuffix(".kernel")


def _hf_module(name_map, path: str) -> str:
    """Our module path -> the transformers 5 in-memory module name PEFT writes."""
    found = name_map.to_hf(path + ".kernel")
    if found is None:
        raise ValueError(f"{path} has no Hugging Face name; it cannot be written as a PEFT adapter")
    hub = found[0].removesuffix(".weight")
    for alias, canonical in name_map.aliases:
        if hub.startswith(canonical):
            return alias + hub[len(canonical) :]
    return hub


def read_peft_config(folder: str | Path, *, dropout: float | None = None) -> tuple[AdapterConfig, dict]:
    """The ``AdapterConfig`` of a PEFT folder (targets filled in by ``load_peft_adapter``) and the raw
    JSON; unsupported settings are a ValueError naming the field."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a PEFT adapter folder (no {CONFIG_FILE})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if raw.get("peft_type") != "LORA":
        raise ValueError(
            f"{path}: peft_type {raw.get('peft_type')!r} is not supported (only LORA, with or "
            f"without use_dora)"
        )
    for field, off in _UNSUPPORTED.items():
        if field in raw and raw[field] not in off:
            raise ValueError(f"{path}: {field}={raw[field]!r} is not supported (supported: {off[0]!r})")
    for field in ("r", "lora_alpha"):
        if not isinstance(raw.get(field), (int, float)) or isinstance(raw.get(field), bool):
            raise ValueError(f"{path}: {field} must be a number, got {raw.get(field)!r}")
    cfg = AdapterConfig(
        kind="dora" if raw.get("use_dora") else "lora",
        rank=int(raw["r"]),
        alpha=float(raw["lora_alpha"]),
        dropout=float(raw.get("lora_dropout", 0.0) if dropout is None else dropout),
    )
    return cfg, raw


def load_peft_adapter(
    model, folder: str | Path, *, dropout: float | None = None, rngs: nnx.Rngs | None = None
):
    """Puts a PEFT LoRA/DoRA adapter folder's layers on ``model`` (in place, unmerged ``LoraLinear``
    layers); returns the ``AdapterConfig`` in effect (its ``targets`` list the adapted paths).

    ``dropout`` overrides the folder's ``lora_dropout`` (it only acts in training).
    """
    from safetensors.numpy import load_file

    folder = Path(folder)
    cfg, _ = read_peft_config(folder, dropout=dropout)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE}")
    tensors = load_file(weights_path)
    name_map = _name_map(model)
    by_path: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(PREFIX):
            raise ValueError(
                f"{weights_path}: unexpected tensor {key!r} (only LoRA A/B and DoRA magnitudes of "
                f"linear layers are supported)"
            )
        module = key[len(PREFIX) : -len(suffix)]
        by_path.setdefault(_module_path(name_map, module, str(weights_path)), {})[SUFFIXES[suffix]] = value
    if not by_path:
        raise ValueError(f"{weights_path}: no adapter tensors")
    wanted = {"lora_a", "lora_b"} | ({"magnitude"} if cfg.kind == "dora" else set())
    for path, parts in by_path.items():
        if set(parts) != wanted:
            raise ValueError(
                f"{weights_path}: {path} has {sorted(parts)}, expected {sorted(wanted)} for {cfg.kind}"
            )
    targets = "|".join(re.escape(p) for p in sorted(by_path))
    cfg = AdapterConfig(kind=cfg.kind, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=targets)
    try:
        apply_adapters(model, cfg, rngs=rngs or nnx.Rngs(params=0, dropout=1))
    except ValueError as e:  # e.g. an adapter on some layers of a stack only
        raise ValueError(f"{weights_path}: {e}") from None
    # Each module's arrays assembled on the host (a stacked one slice by slice), then set once.
    staged: dict[int, tuple[object, dict[str, np.ndarray]]] = {}
    found = set()
    for path, layer, index in adapter_layers(model):
        parts = by_path.get(path)
        if parts is None:
            continue
        found.add(path)
        values = {"lora_a": parts["lora_a"].T, "lora_b": parts["lora_b"].T}
        if cfg.kind == "dora":
            values["magnitude"] = parts["magnitude"]
        _, buffers = staged.setdefault(id(layer), (layer, {}))
        for name, value in values.items():
            var = getattr(layer, name)
            shape = tuple(var.get_value().shape)
            want = shape if index is None else shape[1:]
            if tuple(value.shape) != want:
                raise ValueError(
                    f"{weights_path}: {path}.{name} has shape {tuple(value.shape)}, the model "
                    f"needs {want} (rank {cfg.rank})"
                )
            if index is None:
                buffers[name] = value
            else:
                buffers.setdefault(name, np.zeros(shape, value.dtype))[index] = value
    if found != set(by_path):
        raise ValueError(f"{weights_path}: no linear layer at {sorted(set(by_path) - found)}")
    for layer, buffers in staged.values():
        for name, value in buffers.items():
            var = getattr(layer, name)
            # A device array like every other parameter (a numpy leaf has no sharding to restore onto).
            var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
    return cfg


def save_peft_adapter(model, folder: str | Path, *, base_model: str | Path | None = None) -> Path:
    """Writes ``model``'s (unmerged) LoRA/DoRA layers as a PEFT folder that ``PeftModel.from_pretrained``
    loads onto the transformers model of the base weights. Files are written atomically."""
    from safetensors.numpy import save_file

    layers = adapter_layers(model)
    if not layers:
        raise ValueError(
            "the model has no LoRA/DoRA layers to export (merged, or trained with adapter.kind=full)"
        )
    kinds = {m.is_dora for _, m, _ in layers}
    ranks = {m.rank for _, m, _ in layers}
    scalings = {m.scaling for _, m, _ in layers}
    dropouts = {m.dropout.rate for _, m, _ in layers}
    if len(kinds) != 1 or len(ranks) != 1 or len(scalings) != 1 or len(dropouts) != 1:
        raise ValueError("the adapters differ in kind, rank, alpha or dropout; PEFT folders need one setting")
    name_map = _name_map(model)
    tensors, modules = {}, []
    hosted: dict[tuple[int, str], np.ndarray] = {}  # each module's arrays fetched once

    def host(layer, name, index):
        key = (id(layer), name)
        if key not in hosted:
            hosted[key] = np.asarray(getattr(layer, name)[...], np.float32)
        return hosted[key] if index is None else hosted[key][index]

    for path, layer, index in layers:
        module = _hf_module(name_map, path)
        modules.append(module)
        key = PREFIX + module
        tensors[key + ".lora_A.weight"] = np.ascontiguousarray(host(layer, "lora_a", index).T)
        tensors[key + ".lora_B.weight"] = np.ascontiguousarray(host(layer, "lora_b", index).T)
        if layer.is_dora:
            tensors[key + ".lora_magnitude_vector"] = np.ascontiguousarray(host(layer, "magnitude", index))
    rank = ranks.pop()
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None if base_model is None else str(Path(base_model).absolute()),
        "r": rank,
        "lora_alpha": scalings.pop() * rank,
        "lora_dropout": dropouts.pop(),
        "use_dora": kinds.pop(),
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        # Full module names: PEFT matches a list entry against a module name's end, so a bare
        # "down_proj" would also catch the Qwen2.5-VL vision MLP.
        "target_modules": sorted(modules),
        "inference_mode": True,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS_FILE)
    write_atomic(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return folder


__all__ = ["load_peft_adapter", "read_peft_config", "save_peft_adapter"]
