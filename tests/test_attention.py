"""Attention probabilities against transformers' eager attention, the attention profile against a
numpy computation on transformers' attentions of the official template, and the command."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backbones import archs
from conftest import report

from g2e_jax.analysis import SEGMENTS, attention_profile

SYSTEM = "Given an image, summarize the provided image in one word. Given only text, describe the text in one word."
ATOL = 1e-5


def random_image(height, width, seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def load_eager(path):
    from hf_reference import hf_model_class

    model = hf_model_class(path).from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", local_files_only=True
    )
    return model.eval()


def hf_attentions(hf_model, batch, positions):
    kwargs = dict(
        input_ids=torch.as_tensor(batch["input_ids"]),
        attention_mask=torch.as_tensor(batch["attention_mask"]),
        position_ids=torch.as_tensor(np.asarray(positions), dtype=torch.long),
        output_attentions=True,
    )
    if batch.get("pixel_values") is not None:
        kwargs.update(
            pixel_values=torch.as_tensor(batch["pixel_values"]),
            image_grid_thw=torch.as_tensor(batch["image_grid_thw"]),
            mm_token_type_ids=torch.as_tensor(batch["mm_token_type_ids"]),
        )
    with torch.no_grad():
        out = hf_model.model(**kwargs)
    return out.last_hidden_state.numpy(), [a.numpy() for a in out.attentions]


@pytest.mark.slow
@pytest.mark.parametrize("arch", archs("attention"))  # tests/backbones.py
def test_attention_probabilities_match_transformers_eager(arch, tiny_models):
    """Both schemes' batch shapes: a row with an image (M-RoPE) and a shorter text-only row (padding)."""
    from hf_reference import hf_rope_index

    from g2e_jax.models import load
    from g2e_jax.models.qwen2_vl import rope_index
    from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor

    path = tiny_models(arch)
    processor, hf_model = load_hf_processor(path), load_eager(path)
    head = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
    texts = [
        head + "<|vision_start|><|image_pad|><|vision_end|>What is here?<|im_end|>\n<|im_start|>assistant\n",
        head + "a red car<|im_end|>\n<|im_start|>assistant\n",
    ]
    batch = {
        k: np.asarray(v)
        for k, v in processor(
            text=texts, images=[random_image(56, 84, 1)], padding=True, return_tensors="np"
        ).items()
    }
    ref_hidden, ref = hf_attentions(hf_model, batch, hf_rope_index(hf_model, batch))

    model = load(path, dtype="float32", progress=False)
    positions = rope_index(
        batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], model.config, "mrope"
    )
    args = (
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["image_grid_thw"],
        positions,
    )
    hidden, attentions = model(*args, output_attentions=True)
    assert len(attentions) == len(ref) == model.config.text.num_hidden_layers
    mask = batch["attention_mask"].astype(bool)
    pairs = mask[:, None, :, None] & mask[:, None, None, :]  # real query x real key
    diff = max(
        float(np.abs(np.asarray(a) - r)[np.broadcast_to(pairs, r.shape)].max())
        for a, r in zip(attentions, ref)
    )
    rows = [np.asarray(a)[np.broadcast_to(mask[:, None, :, None], a.shape)] for a in attentions]
    report(f"attention probabilities, tiny {arch}", max_abs_diff=diff, shape=str(tuple(ref[0].shape)))
    assert diff <= ATOL
    # The probabilities are the model's own: each real query row sums to 1 over real keys only.
    assert all(
        np.allclose(np.asarray(a).sum(-1)[np.broadcast_to(mask[:, None], a.shape[:3])], 1, atol=1e-5)
        for a in attentions
    )
    assert all(
        np.abs(np.asarray(a))[~np.broadcast_to(pairs, a.shape) & mask[:, None, :, None]].max() == 0
        for a in attentions
    )
    assert all(r.size for r in rows)
    # With the flag the hidden states are those of the normal path; without it the result is unchanged.
    plain = np.asarray(model(*args))
    assert np.abs(np.asarray(hidden) - plain)[mask].max() <= 1e-5
    assert np.abs(plain - ref_hidden)[mask].max() <= 1e-4


def official_segments(tokenizer, ids):
    """Segments of the official string's tokens, found by reading the tokens (not by our prompt code)."""
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    starts = [i for i, t in enumerate(tokens) if t == "<|im_start|>"]
    user = starts[1]  # system turn first, then the user turn
    end = next(k for k in range(user + 1, len(ids)) if tokenizer.decode(ids[user:k]) == "<|im_start|>user\n")
    segment = np.full(len(ids), 2)
    segment[:end] = 0
    segment[ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")] = 1
    return segment


@pytest.mark.slow
@pytest.mark.parametrize("with_image", [True, False])
def test_profile_matches_numpy_on_transformers_attentions(with_image, tiny_dir):
    from hf_reference import official_template, sequential_positions

    from g2e_jax import Embedder
    from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor

    image = random_image(84, 56, 3) if with_image else None
    text = "<|image_1|> What kind of shape is this?" if with_image else "Find me a caption: a red circle"
    embedder = Embedder.from_pretrained(tiny_dir, dtype="float32", progress=False)
    profile = attention_profile(embedder, text, image, role="query")

    processor, hf_model = load_hf_processor(tiny_dir), load_eager(tiny_dir)
    string = official_template(text, has_image=with_image, role="query", system=SYSTEM, scheme="gen2embed")
    batch = processor(text=[string], images=[image] if with_image else None, return_tensors="np")
    batch = {k: np.asarray(v) for k, v in batch.items()}
    _, attentions = hf_attentions(hf_model, batch, sequential_positions(batch["attention_mask"]))
    segment = official_segments(processor.tokenizer, batch["input_ids"][0])
    onehot = np.eye(3)[segment]
    lam = np.stack([a[0].astype(np.float64).mean(0).sum(0) @ onehot for a in attentions])
    last = np.stack([a[0].astype(np.float64).mean(0)[-1] @ onehot for a in attentions])
    lengths = onehot.sum(0)

    np.testing.assert_array_equal(profile["lengths"], lengths)
    assert (profile["lengths"][1] > 0) == with_image
    diff = float(np.abs(profile["lambda"] - lam).max())
    report(f"attention profile lambda (image={with_image})", max_abs_diff=diff, total=float(lam[0].sum()))
    np.testing.assert_allclose(profile["lambda"], lam, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(profile["last_token"], last, rtol=1e-5, atol=1e-6)
    eff = np.divide(lam, lengths, out=np.zeros_like(lam), where=lengths > 0)
    np.testing.assert_allclose(profile["efficiency"], eff, rtol=1e-5, atol=1e-6)
    assert profile["lambda"].shape == (embedder.config.text.num_hidden_layers, len(SEGMENTS))


def test_command_writes_rows_and_average(tmp_path, tiny_dir, capsys):
    from g2e_jax.cli import main

    random_image(56, 56, 5).save(tmp_path / "shape.png")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"id": "img", "text": "<|image_1|> What is this?", "image": "shape.png"})
        + "\n"
        + json.dumps({"id": 7, "text": "a blue square", "image": None})
        + "\n"
    )
    out = tmp_path / "out"
    code = main(
        ["analyze-attention", f"--config.model.path={tiny_dir}", "--input", str(rows), "--output", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "attention.json").read_text())
    assert [r["id"] for r in result["rows"]] == ["img", "7"] and result["segments"] == list(SEGMENTS)
    assert result["role"] == "query" and result["prompt"]["name"] == "hierarchical"
    for key in ("lambda", "efficiency", "last_token", "lengths"):
        mean = np.mean([r[key] for r in result["rows"]], axis=0)
        np.testing.assert_allclose(result["average"][key], mean)
    assert result["rows"][0]["lengths"][1] > 0 and result["rows"][1]["lengths"][1] == 0
    assert len(result["average"]["lambda"]) == result["layers"] >= 2
    assert (out / "attention.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == ["attention.json", "attention.png"]  # no temporary left

    rows.write_text(json.dumps({"id": "x", "text": "hi", "image": "missing.png"}) + "\n")
    code = main(
        ["analyze-attention", f"--config.model.path={tiny_dir}", "--input", str(rows), "--output", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "g2e-jax analyze-attention: error:" in err and "rows.jsonl line 1 (id 'x'), field 'image'" in err
