"""HF checkpoint <-> NNX: the name map both ways, sharding, streaming, dtype and clear errors."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import report
from g2e_jax import models
from g2e_jax.models.qwen2_vl import NAME_MAP, Qwen2VLConfig, load, save
from g2e_jax.models.qwen2_vl.tiny import make_tiny, random_model, tiny_config
from g2e_jax.models.safetensors_io import SafetensorsReader, write_safetensors


def _params(model) -> dict[str, np.ndarray]:
    return {
        ".".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def _rewrite_tensors(src, dst, rename=lambda n: n, drop=(), extra=None, reshape=None):
    """Copies a single-file checkpoint directory, editing its tensors on the way."""
    shutil.copytree(src, dst)
    reader = SafetensorsReader(src / "model.safetensors")
    tensors = {rename(n): reader.get(n) for n in reader.keys() if n not in drop}
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    tensors.update(extra or {})
    os.remove(dst / "model.safetensors")
    write_safetensors(
        dst / "model.safetensors", [(n, a.shape, a.dtype) for n, a in tensors.items()], tensors.__getitem__
    )
    return dst


def _in_memory_name(hub_name: str) -> str:
    """transformers 5's in-memory (``state_dict``) name for a hub tensor name."""
    if hub_name.startswith("visual."):
        return "model." + hub_name
    if hub_name.startswith("model."):
        return "model.language_model." + hub_name[len("model.") :]
    return hub_name


def test_name_map_is_a_bijection_for_both_name_styles():
    # (stacked path, layer) of every tensor: a stacked parameter once per layer of its leading axis.
    tensors = [(p, layer) for p, v in _params(random_model(tiny_config().replace(tie_word_embeddings=False))).items()
               for _, _, layer in NAME_MAP.hf_names(p, v.shape)]  # fmt: skip
    names = [NAME_MAP.to_hf(p, layer)[0] for p, layer in tensors]
    assert len(names) == len(set(names)) == len(tensors)
    for (path, layer), name in zip(tensors, names):
        assert (NAME_MAP.to_nnx(name).path, NAME_MAP.to_nnx(name).layer) == (path, layer)
        assert (NAME_MAP.to_nnx(_in_memory_name(name)).path, NAME_MAP.to_nnx(_in_memory_name(name)).layer) == (
            path, layer)  # fmt: skip


def test_stacked_and_per_layer_paths():
    """The per-layer path of layer i has ``.{i}`` right after its stack's path, and back; the name map
    answers both spellings with the same hub name."""
    from g2e_jax.models.name_map import stacked_path, unstacked_path

    stacks = ["visual.blocks", "text.layers"]
    assert stacked_path("text.layers.5.attn.q_proj", stacks) == ("text.layers.attn.q_proj", "text.layers", 5)
    assert stacked_path("visual.merger.fc1.kernel", stacks) == ("visual.merger.fc1.kernel", None, None)
    assert unstacked_path("text.layers.attn.q_proj", "text.layers", 5) == "text.layers.5.attn.q_proj"
    assert unstacked_path("visual.blocks.mlp.fc1.kernel", "visual.blocks", 0) == "visual.blocks.0.mlp.fc1.kernel"
    with pytest.raises(ValueError, match="is not under the stack"):
        unstacked_path("text.norm.scale", "text.layers", 0)
    hub = "model.layers.5.self_attn.q_proj.weight"
    assert NAME_MAP.to_hf("text.layers.attn.q_proj.kernel", 5)[0] == hub
    assert NAME_MAP.to_hf("text.layers.5.attn.q_proj.kernel")[0] == hub
    found = NAME_MAP.to_nnx(hub)
    assert (found.path, found.layer) == ("text.layers.attn.q_proj.kernel", 5) and found[0] == found.path
    assert NAME_MAP.to_nnx("visual.merger.ln_q.weight").layer is None


def test_save_load_roundtrip_single_and_sharded(tmp_path):
    model = random_model(tiny_config().replace(tie_word_embeddings=False), seed=3)
    save(model, tmp_path / "single", progress=False)
    save(model, tmp_path / "sharded", max_shard_bytes=100_000, progress=False)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    expected = _params(model)
    for variant in ("single", "sharded"):
        loaded = _params(load(tmp_path / variant, progress=False))
        assert loaded.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(loaded[name], expected[name], err_msg=f"{variant}: {name}")


def test_transformers5_in_memory_names_are_accepted(tiny_dir, tmp_path):
    renamed = _rewrite_tensors(tiny_dir, tmp_path / "renamed", rename=_in_memory_name)
    assert any(
        n.startswith("model.language_model.") for n in SafetensorsReader(renamed / "model.safetensors").keys()
    )
    a, b = _params(load(tiny_dir, progress=False)), _params(load(renamed, progress=False))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_bfloat16_load(tiny_dir, jax_model):
    model16 = load(tiny_dir, dtype="bfloat16", progress=False)
    assert {v.dtype for v in _params(model16).values()} == {np.dtype(jnp.bfloat16)}
    ids = np.arange(40, 72)[None] % 900
    ref = np.asarray(jax_model(ids))
    out = np.asarray(model16(ids)).astype(np.float32)
    diff = float(np.abs(ref - out).max())
    relative = diff / float(np.abs(ref).max())
    report("bfloat16 weights+activations vs float32 (tiny, CPU)", max_abs_diff=diff, relative_to_max=relative)
    assert np.isfinite(out).all()
    # bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 per operation); measured 9.6e-3 of
    # the largest activation through the 2 layers. A wrong cast or a float32 path would be far off
    # (4x larger) or exactly equal.
    assert 1e-4 < relative <= 0.04


def test_load_streams_tensors(tmp_path):
    """Host memory during load stays near one tensor, far below the checkpoint size."""
    cfg = tiny_config(num_hidden_layers=10, hidden_size=128, intermediate_size=512, mrope_section=(4, 6, 6))
    cfg = cfg.replace(vision=cfg.vision.__class__(**{**cfg.vision.__dict__, "out_hidden_size": 128}))
    path = make_tiny(tmp_path / "m", config=cfg)
    size = os.path.getsize(path / "model.safetensors")
    load(path, progress=False)  # first call pays for imports and caches
    tracemalloc.start()
    try:
        load(path, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    report("host memory peak while loading", peak_bytes=peak, checkpoint_bytes=size)
    assert peak < 0.25 * size


def test_hub_flat_config_layout_is_parsed(tmp_path):
    """The layout of the published Qwen2-VL-2B-Instruct config.json (text fields at the top level)."""
    flat = {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_size": 1536,
        "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 151936, "tie_word_embeddings": True,
        "max_position_embeddings": 32768, "hidden_act": "silu", "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(flat))
    cfg = Qwen2VLConfig.from_json(tmp_path)
    assert cfg.text.hidden_size == 1536 and cfg.text.num_key_value_heads == 2
    assert cfg.text.mrope_section == (16, 24, 24) and cfg.text.rope_theta == 1e6
    assert cfg.vision.embed_dim == 1280 and cfg.vision.out_hidden_size == 1536 and cfg.vision.depth == 32
    assert cfg.tie_word_embeddings
    assert Qwen2VLConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        load(tmp_path / "empty")


def test_unsupported_model_type(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_type"] = "llava"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported model_type 'llava'; supported: qwen2_vl, qwen2_5_vl"):
        models.load(tmp_path / "m")
    with pytest.raises(ValueError, match=r"model_type 'llava' is not 'qwen2_vl'"):
        load(tmp_path / "m")


def test_missing_unexpected_and_misshapen_tensors(tiny_dir, tmp_path):
    missing = _rewrite_tensors(tiny_dir, tmp_path / "missing", drop={"model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load(missing, progress=False)
    extra = _rewrite_tensors(
        tiny_dir, tmp_path / "extra", extra={"model.layers.0.foo.weight": np.zeros(3, np.float32)}
    )
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.foo\.weight'"):
        load(extra, progress=False)
    deeper = _rewrite_tensors(
        tiny_dir,
        tmp_path / "deeper",
        extra={"model.layers.7.input_layernorm.weight": np.ones(64, np.float32)},
    )
    with pytest.raises(
        ValueError, match=r"'model\.layers\.7\.input_layernorm\.weight' does not fit the config"
    ):
        load(deeper, progress=False)
    misshapen = _rewrite_tensors(
        tiny_dir, tmp_path / "misshapen", reshape="model.layers.0.self_attn.q_proj.weight"
    )
    with pytest.raises(
        ValueError, match=r"q_proj\.weight' has shape \[63, 64\], but config\.json implies \[64, 64\]"
    ):
        load(misshapen, progress=False)


def test_truncated_safetensors_file(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="extends past the end of the file"):
        load(tmp_path / "m", progress=False)
