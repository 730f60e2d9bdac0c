"""Qwen2-VL <-> Hugging Face checkpoints: one name table, used by both ``load`` and ``save``."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from g2e_jax.io import write_atomic
from g2e_jax.models.dtypes import DTYPES, resolve_dtype
from g2e_jax.models.name_map import FLATTEN_CONV, TRANSPOSE, NameMap, Rule
from g2e_jax.models.qwen2_vl.config import Qwen2VLConfig
from g2e_jax.models.qwen2_vl.model import Qwen2VL
from g2e_jax.models.safetensors_io import iter_checkpoint, write_safetensors

T = TRANSPOSE
NAME_MAP = NameMap(
    rules=(
        Rule("visual.patch_embed.proj.weight", "visual.patch_embed.kernel", FLATTEN_CONV),
        *(
            Rule(f"visual.blocks.{{i}}.{n}.weight", f"visual.blocks.{{i}}.{n}.scale")
            for n in ("norm1", "norm2")
        ),
        *(Rule(f"visual.blocks.{{i}}.{n}.bias", f"visual.blocks.{{i}}.{n}.bias") for n in ("norm1", "norm2")),
        *(
            Rule(f"visual.blocks.{{i}}.{n}.weight", f"visual.blocks.{{i}}.{n}.kernel", T)
            for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
        ),
        *(
            Rule(f"visual.blocks.{{i}}.{n}.bias", f"visual.blocks.{{i}}.{n}.bias")
            for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
        ),
        Rule("visual.merger.ln_q.weight", "visual.merger.ln_q.scale"),
        Rule("visual.merger.ln_q.bias", "visual.merger.ln_q.bias"),
        Rule("visual.merger.mlp.0.weight", "visual.merger.fc1.kernel", T),
        Rule("visual.merger.mlp.0.bias", "visual.merger.fc1.bias"),
        Rule("visual.merger.mlp.2.weight", "visual.merger.fc2.kernel", T),
        Rule("visual.merger.mlp.2.bias", "visual.merger.fc2.bias"),
        Rule("model.embed_tokens.weight", "text.embed_tokens.embedding"),
        *(
            Rule(f"model.layers.{{i}}.self_attn.{p}.weight", f"text.layers.{{i}}.attn.{p}.kernel", T)
            for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        ),
        *(
            Rule(f"model.layers.{{i}}.self_attn.{p}.bias", f"text.layers.{{i}}.attn.{p}.bias")
            for p in ("q_proj", "k_proj", "v_proj")
        ),
        *(
            Rule(f"model.layers.{{i}}.mlp.{p}.weight", f"text.layers.{{i}}.mlp.{p}.kernel", T)
            for p in ("gate_proj", "up_proj", "down_proj")
        ),
        Rule("model.layers.{i}.input_layernorm.weight", "text.layers.{i}.input_norm.scale"),
        Rule("model.layers.{i}.post_attention_layernorm.weight", "text.layers.{i}.post_attn_norm.scale"),
        Rule("model.norm.weight", "text.norm.scale"),
        Rule("lm_head.weight", "lm_head.kernel", T),
    ),
    # transformers 5 in-memory names -> hub names.
    aliases=(("model.visual.", "visual."), ("model.language_model.", "model.")),
)


def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def _hf_shape(rule: Rule, nnx_shape, cfg: Qwen2VLConfig):
    if rule.transform is FLATTEN_CONV:
        v = cfg.vision
        return (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    if rule.transform is TRANSPOSE:
        return tuple(nnx_shape[::-1])
    return tuple(nnx_shape)


def abstract_model(cfg: Qwen2VLConfig, dtype: str = "float32", compute_dtype: str | None = None) -> Qwen2VL:
    """The model's structure with shapes only: nothing allocated, nothing initialised.

    ``dtype`` is the parameters' (master weights), ``compute_dtype`` the matmuls' (default: the
    same); e.g. float32 parameters with bfloat16 compute for mixed-precision training.
    """
    # compute_dtype auto: bf16 matmuls on accelerators; on CPU those of the parameters.
    dtype, compute_dtype = resolve_dtype(dtype), resolve_dtype(compute_dtype, on_cpu=None)
    param, compute = DTYPES[dtype], DTYPES[compute_dtype or dtype]
    return nnx.eval_shape(lambda: Qwen2VL(cfg, dtype=compute, param_dtype=param, rngs=nnx.Rngs(0)))


def load(path: str | Path, dtype: str = "float32", *, compute_dtype: str | None = None,
         progress: bool = True) -> Qwen2VL:  # fmt: skip
    """Loads a local Hugging Face Qwen2-VL directory (single-file or sharded safetensors).

    Tensors are streamed one at a time from memory-mapped files into device arrays of ``dtype``;
    the host never holds a second full copy of the weights.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (expected a local Hugging Face model directory)")
    cfg = Qwen2VLConfig.from_json(path)
    model = abstract_model(cfg, dtype, compute_dtype)
    graphdef, state = nnx.split(model)
    variables = {_path_str(p): v for p, v in nnx.to_flat_state(state)}
    target_dtype = np.dtype(DTYPES[resolve_dtype(dtype)])
    filled: set[str] = set()
    entries = iter_checkpoint(path)
    for reader, name in tqdm(entries, desc=f"loading {path.name}", unit="tensor", disable=not progress):
        match = NAME_MAP.to_nnx(name)
        if match is None:
            raise ValueError(f"{reader.path}: unexpected tensor {name!r} (not part of a Qwen2-VL checkpoint)")
        nnx_path, rule = match
        if nnx_path == "lm_head.kernel" and cfg.tie_word_embeddings:
            continue  # tied: the embedding is the head
        if nnx_path not in variables:
            raise ValueError(
                f"{reader.path}: tensor {name!r} does not fit the config "
                f"(no parameter {nnx_path}; check num_hidden_layers / depth in config.json)"
            )
        variable = variables[nnx_path]
        expected = tuple(variable.get_value().shape)
        got = rule.transform.nnx_shape(reader.shape(name))
        if got != expected:
            raise ValueError(
                f"{reader.path}: tensor {name!r} has shape {list(reader.shape(name))}, "
                f"but config.json implies {list(_hf_shape(rule, expected, cfg))}"
            )
        array = rule.transform.to_nnx(reader.get(name)).astype(target_dtype)
        variable.set_value(jnp.asarray(array))
        filled.add(nnx_path)
    missing = sorted(set(variables) - filled)
    if missing:
        names = [NAME_MAP.to_hf(p)[0] if NAME_MAP.to_hf(p) else p for p in missing]
        raise ValueError(
            f"{path}: missing tensors: {', '.join(names[:8])}" + (" ..." if len(names) > 8 else "")
        )
    return nnx.merge(graphdef, state)


def hf_tensors(model: Qwen2VL):
    """``{hf_name: (nnx variable, rule)}`` for every base parameter of the model."""
    out = {}
    for p, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        match = NAME_MAP.to_hf(_path_str(p))
        if match is None:
            raise ValueError(
                f"parameter {_path_str(p)} has no Hugging Face name; merge adapters before saving"
            )
        out[match[0]] = (variable, match[1])
    return out


def save(
    model: Qwen2VL, path: str | Path, *, max_shard_bytes: int = 5 * 2**30, progress: bool = True
) -> None:
    """Writes ``config.json`` and safetensors in hub layout, loadable by transformers.

    Tensors are fetched from devices one at a time; more than ``max_shard_bytes`` of weights are
    split into shards with a ``model.safetensors.index.json``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors = hf_tensors(model)
    specs = []
    for name in sorted(tensors):
        variable, rule = tensors[name]
        specs.append(
            (name, _hf_shape(rule, variable.get_value().shape, cfg), np.dtype(variable.get_value().dtype))
        )
    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = int(np.prod(spec[1], dtype=np.int64)) * spec[2].itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    shards.append(current)

    def fetch(name):
        variable, rule = tensors[name]
        host = np.asarray(jax.device_get(variable.get_value()))
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
    stale_index = path / "model.safetensors.index.json"
    if len(shards) > 1:
        index = {
            "metadata": {
                "total_size": int(sum(np.prod(s[1], dtype=np.int64) * s[2].itemsize for s in specs))
            },
            "weight_map": {s[0]: f for f, shard in zip(files, shards) for s in shard},
        }
        write_atomic(stale_index, json.dumps(index, indent=2) + "\n")
    elif stale_index.exists():
        stale_index.unlink()
    param_dtype = specs[0][2]
    config = cfg.to_hf_dict()
    config["dtype"] = "bfloat16" if param_dtype == np.dtype(jnp.bfloat16) else str(param_dtype)
    write_atomic(path / "config.json", json.dumps(config, indent=2) + "\n")
