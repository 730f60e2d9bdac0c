"""One architecture as data (``Backbone``), and what every architecture shares: Hugging Face
checkpoints loaded and saved through its name map, random weights, the tiny model directory.

A backbone package (``qwen2_vl``, ``qwen2_5_vl``, ``llava_next``) defines its config class, its model
class, its ``NameMap``, its tiny config, the tiny model's tokenizer/processor files, its chat format and
its image processor, and bundles them in a ``BACKBONE``; ``g2e_jax.models`` dispatches on
``config.json``'s ``model_type`` to it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from g2e_jax.io import write_atomic
from g2e_jax.models.dtypes import DTYPES, resolve_dtype
from g2e_jax.models.name_map import FLATTEN_CONV, TRANSPOSE, NameMap, Rule
from g2e_jax.models.safetensors_io import iter_checkpoint, write_safetensors
from g2e_jax.prompts import ChatFormat


def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, value, layer):
    """``stacked.at[layer].set(value)`` in place (the stacked array donated): loading holds one copy."""
    return stacked.at[layer].set(value)


def _hf_shape(rule: Rule, nnx_shape, cfg):
    if rule.transform is FLATTEN_CONV:
        return cfg.vision.patch_embed_shape
    if rule.transform is TRANSPOSE:
        return tuple(nnx_shape[::-1])
    return tuple(nnx_shape)


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """A backbone's image processor on the host: pixel rows (Qwen2-VL: patches; LLaVA-NeXT: tiles) and a
    geometry of 3 ints per image (``grid_thw``; the anyres layout), and the placeholder tokens it takes."""

    config: Callable[[Path, str | None], Any]  # (model directory, pre-resize resolution) -> settings
    preprocess: Callable[
        ..., tuple[np.ndarray, np.ndarray]
    ]  # (image, settings, *, source) -> (rows, geometry)
    num_tokens: Callable[[np.ndarray, Any], int]  # (geometry, model config) -> image tokens
    # What a prepared dataset (``g2e-jax prepare``) stores, and how its reader turns it back:
    # ``expand(store(image)[0], settings)`` is ``preprocess(image)[0]`` bit for bit (``store`` keeps the
    # resized pixels as uint8, a quarter of float32's bytes).
    settings: type  # the settings' class: ``settings(**dataclasses.asdict(s))`` rebuilds ``s`` from JSON
    # (image, settings, *, source) -> (uint8 rows, geometry)
    store: Callable[..., tuple[np.ndarray, np.ndarray]]
    expand: Callable[[np.ndarray, Any], np.ndarray]  # (uint8 rows, settings) -> preprocess' float32 rows
    stored_dim: Callable[[Any], int]  # settings -> the width of one uint8 row


@dataclasses.dataclass(frozen=True)
class Backbone:
    model_type: str  # config.json's model_type
    config: type  # .from_hf_dict(dict, source) / .from_json(path) / .to_hf_dict()
    model: type  # nnx.Module: model(config, dtype=, param_dtype=, rngs=)
    name_map: NameMap
    tiny_config: Callable[[], Any]  # the tiny random model's config (make-tiny, tests)
    tiny_files: Callable[[Path, Any], None]  # (directory, config): tokenizer and processor files of make-tiny
    chat: ChatFormat  # the chat template around the hierarchical prompt
    images: ImageProcessing

    def abstract_model(self, cfg, dtype: str = "float32", compute_dtype: str | None = None):
        """The model's structure with shapes only: nothing allocated, nothing initialised.

        ``dtype`` is the parameters' (master weights), ``compute_dtype`` the matmuls' (default: the
        same); e.g. float32 parameters with bfloat16 compute for mixed-precision training.
        """
        # compute_dtype auto: bf16 matmuls on accelerators; on CPU those of the parameters.
        dtype, compute_dtype = resolve_dtype(dtype), resolve_dtype(compute_dtype, on_cpu=None)
        param, compute = DTYPES[dtype], DTYPES[compute_dtype or dtype]
        return nnx.eval_shape(lambda: self.model(cfg, dtype=compute, param_dtype=param, rngs=nnx.Rngs(0)))

    def load(self, path: str | Path, dtype: str = "float32", *, compute_dtype: str | None = None,
             progress: bool = True):  # fmt: skip
        """Loads a local Hugging Face model directory (single-file or sharded safetensors).

        Tensors are streamed one at a time from memory-mapped files into device arrays of ``dtype``;
        the host never holds a second full copy of the weights.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"{path}: not a directory (expected a local Hugging Face model directory)"
            )
        cfg = self.config.from_json(path)
        graphdef, state = nnx.split(self.abstract_model(cfg, dtype, compute_dtype))
        variables = {_path_str(p): v for p, v in nnx.to_flat_state(state)}
        target_dtype = np.dtype(DTYPES[resolve_dtype(dtype)])
        filled: set[tuple[str, int | None]] = set()
        entries = iter_checkpoint(path)
        for reader, name in tqdm(entries, desc=f"loading {path.name}", unit="tensor", disable=not progress):
            match = self.name_map.to_nnx(name)
            if match is None:
                raise ValueError(f"{reader.path}: unexpected tensor {name!r} (not part of a {self.model_type} "
                                 "checkpoint)")  # fmt: skip
            nnx_path, rule, layer = match
            if nnx_path == "lm_head.kernel" and cfg.tie_word_embeddings:
                continue  # tied: the embedding is the head
            variable = variables.get(nnx_path)
            shape = None if variable is None else tuple(variable.get_value().shape)
            if variable is None or (layer is not None and layer >= shape[0]):
                raise ValueError(
                    f"{reader.path}: tensor {name!r} does not fit the config "
                    f"(no parameter {nnx_path if layer is None else f'{nnx_path} of layer {layer}'}; "
                    "check num_hidden_layers / depth in config.json)"
                )
            expected = shape if layer is None else shape[1:]
            if rule.transform.nnx_shape(reader.shape(name)) != expected:
                raise ValueError(
                    f"{reader.path}: tensor {name!r} has shape {list(reader.shape(name))}, "
                    f"but config.json implies {list(_hf_shape(rule, expected, cfg))}"
                )
            value = jnp.asarray(rule.transform.to_nnx(reader.get(name)).astype(target_dtype))
            reader.release(name)  # the copy is made: the file's pages need not stay resident
            if layer is None:
                variable.set_value(value)
            else:  # one slice of the stacked parameter, allocated on the device at its first slice
                stacked = variable.get_value()
                if not isinstance(stacked, jax.Array):
                    stacked = jnp.zeros(shape, target_dtype)
                variable.set_value(_set_layer(stacked, value, layer))
            filled.add((nnx_path, layer))
        missing = [
            name
            for p, variable in variables.items()
            for name, _, layer in self.name_map.hf_names(p, variable.get_value().shape) or [(p, None, None)]
            if (p, layer) not in filled
        ]
        if missing:
            raise ValueError(
                f"{path}: missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else "")
            )
        return nnx.merge(graphdef, state)

    def hf_tensors(self, model) -> dict:
        """``{hf_name: (nnx variable, rule, layer)}`` for every base parameter of the model, per layer for
        stacked parameters (``layer`` indexes the variable's leading axis; None outside stacks)."""
        out = {}
        for p, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            names = self.name_map.hf_names(_path_str(p), variable.get_value().shape)
            if names is None:
                raise ValueError(
                    f"parameter {_path_str(p)} has no Hugging Face name; merge adapters before saving"
                )
            out.update((name, (variable, rule, layer)) for name, rule, layer in names)
        return out

    def save(
        self, model, path: str | Path, *, max_shard_bytes: int = 5 * 2**30, progress: bool = True
    ) -> None:
        """Writes ``config.json`` and safetensors in hub layout, loadable by transformers.

        Tensors are fetched from devices one at a time; more than ``max_shard_bytes`` of weights are
        split into shards with a ``model.safetensors.index.json``.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = model.config
        tensors = self.hf_tensors(model)
        specs = []
        for name in sorted(tensors):
            variable, rule, layer = tensors[name]
            value = variable.get_value()
            shape = value.shape if layer is None else value.shape[1:]
            specs.append((name, _hf_shape(rule, shape, cfg), np.dtype(value.dtype)))
        shards, current, size = [], [], 0
        for spec in specs:
            nbytes = int(np.prod(spec[1], dtype=np.int64)) * spec[2].itemsize
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = [], 0
            current.append(spec)
            size += nbytes
        shards.append(current)

        def fetch(name):  # one tensor (one layer's slice of a stacked parameter) leaves the device at a time
            variable, rule, layer = tensors[name]
            value = variable.get_value()
            host = np.asarray(jax.device_get(value if layer is None else value[layer]))
            return rule.transform.to_hf(host, _hf_shape(rule, host.shape, cfg))

        files = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        for file, shard in tqdm(
            list(zip(files, shards)), desc=f"saving {path.name}", unit="shard", disable=not progress
        ):
            write_safetensors(path / file, shard, fetch, metadata={"format": "pt"})
        index_file = path / "model.safetensors.index.json"
        if len(shards) > 1:
            index = {
                "metadata": {
                    "total_size": int(sum(np.prod(s[1], dtype=np.int64) * s[2].itemsize for s in specs))
                },
                "weight_map": {s[0]: f for f, shard in zip(files, shards) for s in shard},
            }
            write_atomic(index_file, json.dumps(index, indent=2) + "\n")
        elif index_file.exists():
            index_file.unlink()  # stale, from an earlier sharded save
        config = cfg.to_hf_dict()
        config["dtype"] = "bfloat16" if specs[0][2] == np.dtype(jnp.bfloat16) else str(specs[0][2])
        write_atomic(path / "config.json", json.dumps(config, indent=2) + "\n")
