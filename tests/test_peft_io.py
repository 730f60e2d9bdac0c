"""PEFT adapter folders in and out: written by real PEFT, read by us (and the reverse), refused when
they hold settings we do not compute. Float32, the tiny model."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from conftest import report

from g2e_jax.adapters.lora import adapter_layers, merge_adapters
from g2e_jax.adapters.peft import load_peft_adapter, save_peft_adapter
from g2e_jax.models.qwen2_vl import load, rope_index

HF_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.down_proj)"


def peft_model(tiny_dir, kind, seed=1, **config):
    """transformers + PEFT with random non-zero A, B (and magnitude): B = 0 would hide bugs."""
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from hf_reference import load_hf_model, perturb_adapters

    options = dict(r=4, lora_alpha=16, target_modules=HF_TARGETS, use_dora=kind == "dora")
    wrapped = peft.get_peft_model(load_hf_model(tiny_dir), peft.LoraConfig(**{**options, **config}))
    perturb_adapters(wrapped, seed)
    return wrapped.eval()


def text_batch(cfg):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 200, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask, rope_index(ids, mask, None, cfg, "mrope")


def hidden(torch_model, batch):
    from hf_reference import hf_hidden_states

    ids, mask, pos = batch
    return hf_hidden_states(
        torch_model, {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}, pos
    )


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_folder_loads_onto_the_base_model(tiny_dir, tmp_path, kind):
    wrapped = peft_model(tiny_dir, kind)
    wrapped.save_pretrained(tmp_path / "adapter")
    ours = load(tiny_dir, progress=False)
    cfg = load_peft_adapter(ours, tmp_path / "adapter")
    assert cfg.kind == kind and cfg.rank == 4 and cfg.scaling == 4.0
    assert len(adapter_layers(ours)) == 10  # 2 layers x 5 targets
    ours.eval()
    batch = text_batch(ours.config)
    real = batch[1].astype(bool)
    ref = hidden(wrapped.base_model.model, batch)
    out = np.asarray(ours(batch[0], batch[1], position_ids=batch[2]))
    diff = float(np.abs(ref[real] - out[real]).max())
    with wrapped.disable_adapter():
        base = hidden(wrapped.base_model.model, batch)
    effect = float(np.abs(ref[real] - base[real]).max())
    report(f"PEFT {kind} folder -> ours, hidden states", max_abs_diff=diff, adapter_effect=effect)
    assert effect > 1e-2 and diff <= 1e-5


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_our_folder_loads_in_peft_unmerged(tiny_dir, tmp_path, kind):
    """Load a PEFT folder, write it back: PEFT's keys exactly, and PeftModel.from_pretrained computes
    what our unmerged model computes."""
    from safetensors.numpy import load_file

    peft = pytest.importorskip("peft")
    from hf_reference import load_hf_model

    wrapped = peft_model(tiny_dir, kind, seed=2)
    wrapped.save_pretrained(tmp_path / "theirs")
    ours = load(tiny_dir, progress=False)
    load_peft_adapter(ours, tmp_path / "theirs")
    save_peft_adapter(ours, tmp_path / "ours", base_model=tiny_dir)
    theirs_t, ours_t = (
        load_file(tmp_path / "theirs/adapter_model.safetensors"),
        load_file(tmp_path / "ours/adapter_model.safetensors"),
    )
    assert sorted(ours_t) == sorted(theirs_t)
    assert max(float(np.abs(ours_t[k] - theirs_t[k]).max()) for k in ours_t) == 0.0
    reloaded = peft.PeftModel.from_pretrained(load_hf_model(tiny_dir), tmp_path / "ours").eval()
    assert isinstance(
        reloaded.base_model.model.model.language_model.layers[0].self_attn.q_proj, peft.tuners.lora.Linear
    )
    assert reloaded.peft_config["default"].use_dora == (kind == "dora")
    ours.eval()
    batch = text_batch(ours.config)
    real = batch[1].astype(bool)
    diff = float(
        np.abs(
            hidden(reloaded.base_model.model, batch)[real]
            - np.asarray(ours(batch[0], batch[1], position_ids=batch[2]))[real]
        ).max()
    )
    report(f"our {kind} folder -> PeftModel.from_pretrained", max_abs_diff=diff)
    assert diff <= 1e-5
    config = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_dir.absolute())


def test_embedder_with_adapter_matches_the_official_pipeline(tiny_dir, tmp_path):
    """``Embedder.from_pretrained(base, adapter=DIR)`` against transformers + PEFT through the official
    string template, processor and pooling."""
    from hf_reference import OFFICIAL_SYSTEM, official_embeddings, official_template

    from g2e_jax import Embedder
    from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor

    wrapped = peft_model(tiny_dir, "dora", seed=3)
    wrapped.save_pretrained(tmp_path / "adapter")
    texts = ["a red car", "Find a caption for the news in the given photo."]
    strings = [
        official_template(t, has_image=False, role="query", system=OFFICIAL_SYSTEM, scheme="gen2embed")
        for t in texts
    ]
    ref = official_embeddings(
        wrapped.base_model.model, load_hf_processor(tiny_dir), strings, [None, None], scheme="gen2embed"
    )
    emb = Embedder.from_pretrained(tiny_dir, adapter=tmp_path / "adapter", dtype="float32", progress=False)
    plain = Embedder.from_pretrained(tiny_dir, dtype="float32", progress=False)
    ours = emb.encode(texts, role="query")
    cosine = (ref * ours).sum(-1)
    report(
        "Embedder(adapter=PEFT DoRA) vs official pipeline + PEFT",
        one_minus_min_cosine=float(1 - cosine.min()),
    )
    assert cosine.min() >= 0.99999
    assert (ref * plain.encode(texts, role="query")).sum(-1).min() < 0.999  # the adapter matters
    assert emb.weights_id != plain.weights_id  # caches keyed by weights tell them apart


def test_cli_embed_takes_an_adapter(tiny_dir, tmp_path):
    from g2e_jax import Embedder
    from g2e_jax.cli import main

    peft_model(tiny_dir, "lora", seed=4).save_pretrained(tmp_path / "adapter")
    (tmp_path / "rows.jsonl").write_text('{"id": "a", "text": "a red car", "image": null}\n')
    rc = main(
        [
            "embed",
            "--input",
            str(tmp_path / "rows.jsonl"),
            "--output",
            str(tmp_path / "out"),
            "--role",
            "document",
            f"--config.model.path={tiny_dir}",
            "--config.model.dtype=float32",
            f"--config.model.adapter={tmp_path / 'adapter'}",
        ]
    )
    assert rc == 0
    want = Embedder.from_pretrained(tiny_dir, adapter=tmp_path / "adapter", dtype="float32", progress=False)
    np.testing.assert_allclose(
        np.load(tmp_path / "out/embeddings.npy"), want.encode(["a red car"], role="document"), atol=1e-6
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_rslora": True}, "use_rslora"),
        ({"bias": "all"}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"r": "eight"}, "r must be a number"),
    ],
)
def test_unsupported_settings_are_clear_errors(tiny_dir, tmp_path, change, message):
    peft_model(tiny_dir, "lora").save_pretrained(tmp_path / "a")
    path = tmp_path / "a/adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(load(tiny_dir, progress=False), tmp_path / "a")


def test_unsupported_modules_are_clear_errors(tiny_dir, tmp_path):
    """An adapter on the token embedding (not a linear layer) and a missing DoRA magnitude."""
    peft_model(tiny_dir, "lora", target_modules=["embed_tokens"]).save_pretrained(tmp_path / "emb")
    with pytest.raises(ValueError, match="unexpected tensor .*embed_tokens"):
        load_peft_adapter(load(tiny_dir, progress=False), tmp_path / "emb")
    peft_model(tiny_dir, "lora").save_pretrained(tmp_path / "lora")
    path = tmp_path / "lora/adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_dora": True}))
    with pytest.raises(ValueError, match="expected .*magnitude"):
        load_peft_adapter(load(tiny_dir, progress=False), tmp_path / "lora")
    shutil.rmtree(tmp_path / "lora")
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        load_peft_adapter(load(tiny_dir, progress=False), tmp_path / "lora")


def test_embed_does_not_import_train():
    """The Embedder sits above ``g2e_jax.adapters`` only: importing it pulls in no training code."""
    import subprocess

    code = "import sys, g2e_jax.embed; print(sorted(m for m in sys.modules if m.startswith('g2e_jax.train')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_merge_after_load_equals_unmerged(tiny_dir, tmp_path):
    peft_model(tiny_dir, "dora", seed=5).save_pretrained(tmp_path / "a")
    ours = load(tiny_dir, progress=False)
    load_peft_adapter(ours, tmp_path / "a")
    ours.eval()
    batch = text_batch(ours.config)
    before = np.asarray(ours(batch[0], batch[1], position_ids=batch[2]))
    merge_adapters(ours)
    after = np.asarray(ours(batch[0], batch[1], position_ids=batch[2]))
    assert np.abs(before - after)[batch[1].astype(bool)].max() <= 1e-5
