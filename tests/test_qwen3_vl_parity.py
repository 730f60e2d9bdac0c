"""Qwen3-VL against transformers' ``Qwen3VLForConditionalGeneration`` on random weights, float32
(DESIGN.md §3, §6): config.json both ways, the rope index, forward parity (text only, one image, images of
different sizes with a text row, padded buckets under jit), the vision tower with its DeepStack features,
the image processor bit for bit on odd sizes, and the checkpoint round trip.

The tiny model (``qwen3_vl.tiny_config``): 3 decoder layers, 3 vision blocks with DeepStack taps after
blocks 0 and 1 (so decoder layer 2 gets no DeepStack feature), a 4x4 learned position table; the test
images' patch grids (2x12, 4x4, 6x8, 10x6) interpolate it down, not at all, and up.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from conftest import assert_parity, real_token_diff, report  # noqa: E402
from hf_reference import hf_hidden_states, hf_rope_index, load_hf_model  # noqa: E402
from test_qwen2_vl_jit import _forward, _pad  # noqa: E402
from test_qwen2_vl_parity import VISION, encode, prompt, random_image  # noqa: E402

from g2e_jax import models  # noqa: E402
from g2e_jax.cli import main  # noqa: E402
from g2e_jax.models.qwen2_vl import images  # noqa: E402
from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor  # noqa: E402
from g2e_jax.models.qwen3_vl import QWEN3_VL_2B, QWEN3_VL_8B, Qwen3VL, Qwen3VLConfig, rope_index  # noqa: E402
from g2e_jax.models.safetensors_io import SafetensorsReader  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_vl") / "tiny"
    assert main(["make-tiny", "--arch", "qwen3_vl", "--output", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    loaded = models.load(model_dir, progress=False)  # dispatched on config.json's model_type
    assert isinstance(loaded, Qwen3VL)
    return loaded


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return load_hf_model(model_dir)


@pytest.fixture(scope="module")
def processor(model_dir):
    return load_hf_processor(model_dir)


@pytest.mark.parametrize("cfg", [QWEN3_VL_2B, QWEN3_VL_8B], ids=["2b", "8b"])
def test_config_json_both_ways(cfg):
    """Our config.json is transformers' config, field for field, and reads back to the same config."""
    from transformers import Qwen3VLConfig as HFConfig

    hf = HFConfig(**cfg.to_hf_dict())
    t, v = hf.text_config, hf.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (
        cfg.text.hidden_size, cfg.text.num_hidden_layers, cfg.text.num_attention_heads,
        cfg.text.num_key_value_heads, cfg.text.head_dim)  # fmt: skip
    assert t.attention_bias is False and t.rope_parameters["mrope_section"] == list(cfg.text.mrope_section)
    assert t.rope_parameters["rope_theta"] == cfg.text.rope_theta == 5e6
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_position_embeddings, v.patch_size) == (
        cfg.vision.depth, cfg.vision.embed_dim, cfg.vision.intermediate_size, cfg.vision.num_position_embeddings,
        16)  # fmt: skip
    assert list(v.deepstack_visual_indexes) == list(cfg.vision.deepstack_visual_indexes)
    assert hf.tie_word_embeddings == cfg.tie_word_embeddings
    assert Qwen3VLConfig.from_hf_dict(hf.to_dict()) == cfg
    assert Qwen3VLConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


def test_config_errors_name_the_field():
    d = QWEN3_VL_2B.to_hf_dict()
    d["vision_config"]["deepstack_visual_indexes"] = [11, 5]
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        Qwen3VLConfig.from_hf_dict(d)
    d = QWEN3_VL_2B.to_hf_dict()
    d["vision_config"]["num_position_embeddings"] = 2300
    with pytest.raises(ValueError, match="num_position_embeddings"):
        Qwen3VLConfig.from_hf_dict(d)


def test_text_only(processor, hf_model, model):
    batch = encode(processor, [prompt("a cat"), prompt("Represent the given text in one word. " * 3)])
    positions = rope_index(batch["input_ids"], batch["attention_mask"], None, model.config, "mrope")
    real = batch["attention_mask"].astype(bool)  # padded slots never reach a real token
    np.testing.assert_array_equal(positions[:, real], hf_rope_index(hf_model, batch)[:, real])
    ref = hf_hidden_states(hf_model, batch, positions)
    out = np.asarray(model(batch["input_ids"], batch["attention_mask"], position_ids=positions))
    assert_parity("Qwen3-VL text-only, right padding", ref, out, batch["attention_mask"])


def test_one_image_smaller_than_the_position_table(processor, hf_model, model):
    """A 2x12 patch grid: the 4x4 table interpolated down in height, up in width."""
    batch = encode(processor, [prompt(f"{VISION}What is in the image?")], [random_image(40, 200, 1)])
    assert batch["image_grid_thw"].tolist() == [[1, 2, 12]]
    positions = rope_index(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], model.config)
    np.testing.assert_array_equal(positions, hf_rope_index(hf_model, batch))
    ref = hf_hidden_states(hf_model, batch, positions)
    out = np.asarray(model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                           batch["image_grid_thw"]))  # fmt: skip
    assert_parity("Qwen3-VL one image (2x12 patches)", ref, out, batch["attention_mask"])


def test_images_of_different_sizes_and_a_text_row(processor, hf_model, model):
    """Rows: one image; text only; two images of different sizes back to back, then a third. Our
    positions are derived on the host; every layer's hidden states match too."""
    imgs = [random_image(64, 64, 2), random_image(96, 128, 3), random_image(160, 96, 4), random_image(70, 90, 5)]
    texts = [prompt(f"{VISION}first"), prompt("text only row"), prompt(f"two: {VISION}{VISION} and {VISION} end")]
    batch = encode(processor, texts, imgs)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 8], [1, 10, 6], [1, 4, 6]]
    mask = batch["attention_mask"]
    real = mask.astype(bool)
    hf_positions = hf_rope_index(hf_model, batch)
    ours = rope_index(batch["input_ids"], mask, batch["image_grid_thw"], model.config, "mrope")
    np.testing.assert_array_equal(ours[:, real], hf_positions[:, real])
    ref, ref_all = hf_hidden_states(hf_model, batch, hf_positions, output_hidden_states=True)
    out, out_all = model(batch["input_ids"], mask, batch["pixel_values"], batch["image_grid_thw"],
                         output_hidden_states=True)  # fmt: skip
    out = np.asarray(out)
    for row, case in enumerate(["one image", "text-only row in an image batch", "three images of different sizes"]):
        assert_parity(f"Qwen3-VL {case}", ref[row : row + 1], out[row : row + 1], mask[row : row + 1])
    assert len(out_all) == len(ref_all) == model.config.text.num_hidden_layers + 1
    layers = [real_token_diff(r, o, mask) for r, o in zip(ref_all, out_all)]
    report("Qwen3-VL every layer's hidden states (3 rows above)", max_abs_diff=max(layers))
    assert max(layers) <= ATOL


def test_vision_tower_and_deepstack_features(processor, hf_model, model):
    """The merged features and each DeepStack merger's, under jit, against transformers' vision model."""
    imgs = [random_image(40, 200, 6), random_image(64, 64, 7), random_image(96, 128, 8), random_image(160, 96, 9)]
    batch = encode(processor, [prompt(VISION)] * 4, imgs)
    with torch.no_grad():
        ref = hf_model.model.visual(torch.as_tensor(batch["pixel_values"]),
                                    grid_thw=torch.as_tensor(batch["image_grid_thw"]))  # fmt: skip
    features = nnx.jit(lambda m, p, g: m.deepstack_features(p, g, max_patches_per_image=64))
    merged, deepstack = features(model, batch["pixel_values"], batch["image_grid_thw"])
    refs = [ref.pooler_output.numpy()] + [f.numpy() for f in ref.deepstack_features]
    outs = [np.asarray(merged)] + list(np.asarray(deepstack))
    assert len(outs) == 1 + len(model.config.vision.deepstack_visual_indexes)
    diffs = [float(np.abs(r - o).max()) for r, o in zip(refs, outs)]
    report("Qwen3-VL vision tower (jit): merged, then each DeepStack level", max_abs_diff=diffs)
    assert [o.shape for o in outs] == [r.shape for r in refs]
    assert max(diffs) <= ATOL


def test_jit_with_padded_buckets(processor, hf_model, model):
    """Traced grids, a static max_patches_per_image, padding rows, tokens, patches and images [0, 0, 0]."""
    imgs = [random_image(96, 128, 10), random_image(160, 96, 11)]
    batch = encode(processor, [prompt(f"{VISION}a"), prompt("text"), prompt(f"{VISION}b")], imgs)
    ids, mask, grid = batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]
    positions = hf_rope_index(hf_model, batch)
    ref = hf_hidden_states(hf_model, batch, positions)
    rows, length, patches = 4, ids.shape[1] + 9, batch["pixel_values"].shape[0] + 36
    out = _forward(model, _pad(ids, (rows, length)), _pad(mask, (rows, length)),
                   _pad(batch["pixel_values"], (patches, batch["pixel_values"].shape[1])), _pad(grid, (4, 3)),
                   _pad(positions, (3, rows, length), value=1), 64)  # fmt: skip
    out = np.asarray(out)
    assert np.isfinite(out).all()
    assert_parity("Qwen3-VL under jit, padded buckets", ref, out[: ids.shape[0], : ids.shape[1]], mask)


@pytest.mark.parametrize("size", [(57, 83), (101, 67), (33, 211), (250, 131)])
def test_image_processor_bit_exact_on_odd_sizes(model_dir, processor, size):
    """Qwen2-VL's processor arithmetic with the checkpoint's patch 16 and mean = std = 0.5."""
    cfg = images.ImageConfig.from_preprocessor_config(model_dir)
    assert (cfg.patch_size, cfg.image_mean, cfg.image_std) == (16, (0.5,) * 3, (0.5,) * 3)
    image = random_image(*size, seed=sum(size))
    ref = processor.image_processor(images=[image], return_tensors="np")
    patches, grid = images.preprocess(image, cfg)
    np.testing.assert_array_equal(grid, np.asarray(ref["image_grid_thw"])[0])
    assert patches.dtype == np.asarray(ref["pixel_values"]).dtype
    np.testing.assert_array_equal(patches, np.asarray(ref["pixel_values"]))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_checkpoint_round_trip(model_dir, tmp_path, tied):
    """load -> save writes the same tensor names and bytes and the same config.json (the untied
    checkpoint, as the 8B's, carries ``lm_head.weight``); transformers loads it without a missing key."""
    src = model_dir
    if not tied:
        src = tmp_path / "untied"
        models.make_tiny(src, arch="qwen3_vl", config=models.BACKBONES["qwen3_vl"].tiny_config().replace(
            tie_word_embeddings=False))  # fmt: skip
    out = tmp_path / "saved"
    models.save(models.load(src, progress=False), out, progress=False)
    a, b = SafetensorsReader(src / "model.safetensors"), SafetensorsReader(out / "model.safetensors")
    assert sorted(a.keys()) == sorted(b.keys())
    assert ("lm_head.weight" in a.keys()) == (not tied)
    for name in a.keys():
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name
    assert json.loads((src / "config.json").read_text()) == json.loads((out / "config.json").read_text())
    from transformers import Qwen3VLForConditionalGeneration

    _, info = Qwen3VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
