"""Qwen3-VL: the name map both ways (transformers' save read exactly, ours read by transformers), the
hub config.json of the released 2B, dispatch, the declared axes of its new parameters, adapters on its
decoder and vision modules, PEFT folders in and out (DoRA, with an image: DeepStack under adapters), and
the training trajectory against torch + PEFT. Training with DoRA + GradCache then export-hf (merged and
PEFT) is test_backbones::test_train_then_export_hf[qwen3_vl] (its spec's adapter is DoRA)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from conftest import report
from g2e_jax import models
from g2e_jax.models.qwen3_vl import BACKBONE, NAME_MAP, QWEN3_VL_2B, Qwen3VL, tiny_config
from g2e_jax.models.tiny import random_model

# PEFT targets in transformers' names: the decoder's default set, a vision block's qkv and the
# DeepStack mergers' first linear.
HF_TARGETS = (r".*(language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.down_proj)"
              r"|visual\.blocks\.\d+\.attn\.qkv|visual\.deepstack_merger_list\.\d+\.linear_fc1)")  # fmt: skip


def _params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}  # fmt: skip


def test_name_map_is_a_bijection():
    tensors = [(p, layer) for p, v in _params(random_model(BACKBONE, tiny_config().replace(tie_word_embeddings=False))).items()
               for _, _, layer in NAME_MAP.hf_names(p, v.shape)]  # fmt: skip
    names = [NAME_MAP.to_hf(p, layer)[0] for p, layer in tensors]
    assert len(names) == len(set(names)) == len(tensors)
    for name in ("model.visual.pos_embed.weight", "model.visual.patch_embed.proj.bias",
                 "model.visual.deepstack_merger_list.1.norm.weight", "model.visual.merger.linear_fc2.bias",
                 "model.visual.blocks.2.mlp.linear_fc1.weight", "model.language_model.layers.2.self_attn.k_norm.weight",
                 "lm_head.weight"):  # fmt: skip
        assert name in names
    assert not any("self_attn.q_proj.bias" in n for n in names)  # no q/k/v bias
    for (path, layer), name in zip(tensors, names):
        assert (NAME_MAP.to_nnx(name).path, NAME_MAP.to_nnx(name).layer) == (path, layer)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_transformers_reads_our_save_and_we_read_its_save_exactly(tmp_path, tied):
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    cfg = tiny_config().replace(tie_word_embeddings=tied)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    torch.manual_seed(0)
    hf = Qwen3VLForConditionalGeneration(AutoConfig.from_pretrained(tmp_path / "cfg")).eval()
    with torch.no_grad():  # transformers initialises norms to ones and biases to zeros: perturb them all
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    ours = models.load(tmp_path / "hf", progress=False)
    assert isinstance(ours, Qwen3VL) and ours.config == cfg
    models.save(ours, tmp_path / "ours", max_shard_bytes=100_000, progress=False)
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    back = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "ours", local_files_only=True).eval()
    original, reloaded = hf.state_dict(), back.state_dict()
    assert original.keys() == reloaded.keys()
    for name in original:
        assert torch.equal(original[name], reloaded[name]), name


def test_hub_config_of_the_2b(tmp_path):
    """The layout of the published Qwen3-VL-2B-Instruct config.json (nested, ``rope_scaling``, the vision
    config's old model_type), typed out here."""
    hub = {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "image_token_id": 151655,
        "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "tie_word_embeddings": True,
        "text_config": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
                        "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
                        "intermediate_size": 6144, "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
                        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
                        "rms_norm_eps": 1e-06, "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                        "rope_type": "default"}, "rope_theta": 5000000, "tie_word_embeddings": True,
                        "vocab_size": 151936},
        "vision_config": {"deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
                          "hidden_size": 1024, "in_channels": 3, "intermediate_size": 4096, "model_type": "qwen3_vl",
                          "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16,
                          "spatial_merge_size": 2, "temporal_patch_size": 2},
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(hub))
    cfg = models.read_config(tmp_path)
    assert cfg == QWEN3_VL_2B
    assert (cfg.text.head_dim, cfg.vision.position_side, cfg.vision.head_dim) == (128, 48, 64)


def test_declared_axes_of_the_new_parameters():
    from g2e_jax.mesh import declared_axes

    model = random_model(BACKBONE, tiny_config())
    axes = {}
    for keys, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        a = declared_axes(v)
        path = ".".join(str(k) for k in keys if not isinstance(k, int))
        axes[path] = a[1:] if a and a[0] == "layers" else a
    assert axes["visual.pos_embed.embedding"] == ("vision_positions", "vision_embed")
    assert axes["visual.patch_embed.bias"] == ("vision_embed",)
    assert axes["visual.deepstack_mergers.ln_q.scale"] == ("norm",)
    assert axes["visual.deepstack_mergers.fc1.kernel"] == ("merge", "vision_embed")
    assert axes["visual.deepstack_mergers.fc2.kernel"] == ("merge", "embed")
    assert axes["text.layers.attn.q_norm.scale"] == axes["text.layers.attn.k_norm.scale"] == ("norm",)


def test_adapters_on_the_decoder_by_default_and_on_vision_modules_by_name():
    from g2e_jax.adapters.lora import AdapterConfig, apply_adapters

    model = random_model(BACKBONE, tiny_config())
    targets = apply_adapters(model, AdapterConfig(kind="lora"), rngs=nnx.Rngs(0))
    assert targets and all(t.startswith("text.layers.") for t in targets)
    assert len(targets) == 5 * model.config.text.num_hidden_layers
    model = random_model(BACKBONE, tiny_config())
    vision = AdapterConfig(kind="dora", targets=r"visual\.blocks\.\d+\.attn\.qkv|visual\.deepstack_mergers\.\d+\.fc1")
    targets = apply_adapters(model, vision, rngs=nnx.Rngs(0))
    assert targets == [f"visual.blocks.{i}.attn.qkv" for i in range(3)] + [
        f"visual.deepstack_mergers.{i}.fc1" for i in range(2)]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return models.make_tiny(tmp_path_factory.mktemp("qwen3_vl_peft") / "tiny", arch="qwen3_vl")


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_folders_in_and_out_with_an_image(model_dir, tmp_path, kind):
    """A real PEFT folder (decoder, vision block and DeepStack-merger targets) loads onto ours and computes
    what PEFT computes on an image batch; written back, PEFT's keys and values exactly, and
    ``PeftModel.from_pretrained`` computes the same."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from hf_reference import hf_hidden_states, hf_rope_index, load_hf_model, perturb_adapters
    from safetensors.numpy import load_file
    from test_qwen2_vl_parity import VISION, encode, prompt, random_image

    from g2e_jax.adapters.lora import adapter_layers
    from g2e_jax.adapters.peft import load_peft_adapter, save_peft_adapter
    from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor

    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=HF_TARGETS, use_dora=kind == "dora")
    wrapped = perturb_adapters(peft.get_peft_model(load_hf_model(model_dir), config), seed=3).eval()
    wrapped.save_pretrained(tmp_path / "theirs")
    ours = models.load(model_dir, progress=False)
    load_peft_adapter(ours, tmp_path / "theirs")
    assert len(adapter_layers(ours)) == 5 * 3 + 3 + 2
    ours.eval()
    batch = encode(load_hf_processor(model_dir), [prompt(f"{VISION}a photo"), prompt("text")],
                   [random_image(96, 128, 4)])  # fmt: skip
    positions = hf_rope_index(wrapped.base_model.model, batch)
    ref = hf_hidden_states(wrapped.base_model.model, batch, positions)
    with wrapped.disable_adapter():
        base = hf_hidden_states(wrapped.base_model.model, batch, positions)
    out = np.asarray(ours(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"]))
    real = batch["attention_mask"].astype(bool)
    diff, effect = float(np.abs(ref[real] - out[real]).max()), float(np.abs(ref[real] - base[real]).max())
    report(f"Qwen3-VL PEFT {kind} folder -> ours, image batch", max_abs_diff=diff, adapter_effect=effect)
    assert effect > 1e-2 and diff <= 1e-5
    save_peft_adapter(ours, tmp_path / "ours", base_model=model_dir)
    theirs_t, ours_t = load_file(tmp_path / "theirs/adapter_model.safetensors"), load_file(
        tmp_path / "ours/adapter_model.safetensors")  # fmt: skip
    assert sorted(ours_t) == sorted(theirs_t)
    assert max(float(np.abs(ours_t[k] - theirs_t[k]).max()) for k in ours_t) == 0.0
    reloaded = peft.PeftModel.from_pretrained(load_hf_model(model_dir), tmp_path / "ours").eval()
    with torch.no_grad():
        again = hf_hidden_states(reloaded.base_model.model, batch, positions)
    assert float(np.abs(again[real] - out[real]).max()) <= 1e-5


@pytest.mark.slow
def test_training_trajectory_matches_peft_and_torch(model_dir, tmp_path):
    """test_trajectory_parity's comparison on the tiny Qwen3-VL: DoRA, GradCache, 5 AdamW steps with an
    image batch (DeepStack, the interpolated positions and the block segments under the gradient)."""
    pytest.importorskip("peft")
    from test_trajectory_parity import STEPS, compare, make_adapter, our_trajectory, torch_trajectory

    folder = make_adapter(model_dir, tmp_path / "dora", "dora")
    ref = torch_trajectory(model_dir, folder, STEPS)
    ours = our_trajectory(model_dir, folder, STEPS, grad_cache=True)
    compare("dora, GradCache on, tiny Qwen3-VL", ours, ref)
