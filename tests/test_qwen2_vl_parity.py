"""Forward parity with transformers' Qwen2-VL on random weights, float32 (DESIGN.md §3)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import pooled_cosine, real_token_diff, report  # noqa: E402
from hf_reference import hf_hidden_states, hf_rope_index, load_hf_model, sequential_positions  # noqa: E402

from g2e_jax.models.qwen2_vl import rope_index  # noqa: E402
from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor  # noqa: E402

ATOL = 1e-4
MIN_COSINE = 0.99999

SYSTEM = "<|im_start|>system\nGiven an image, summarize the provided image in one word.<|im_end|>\n"
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def prompt(user: str) -> str:
    return f"{SYSTEM}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def random_image(height: int, width: int, seed: int):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    return load_hf_model(tiny_dir)


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return load_hf_processor(tiny_dir)


def encode(processor, texts, images=None, padding_side="right"):
    processor.tokenizer.padding_side = padding_side
    try:
        out = processor(text=texts, images=images, padding=True, return_tensors="np")
    finally:
        processor.tokenizer.padding_side = "right"
    return {k: np.asarray(v) for k, v in out.items()}


def batches(processor):
    """The parity cases: name -> (processor batch, rope scheme)."""
    a, b, c = random_image(56, 56, 1), random_image(84, 112, 2), random_image(112, 56, 3)
    return {
        "text-only, right padding": (
            encode(processor, [prompt("a cat"), prompt("Represent the given text in one word. " * 3)]),
            "mrope",
        ),
        "text-only, left padding": (
            encode(
                processor,
                [prompt("short"), prompt("a much longer query about the weather " * 2)],
                None,
                "left",
            ),
            "mrope",
        ),
        "one image": (encode(processor, [prompt(f"{VISION}What is in the image?")], [a]), "mrope"),
        "several images of different sizes + text-only rows": (
            encode(
                processor,
                [
                    prompt(f"{VISION}first"),
                    prompt("text only row"),
                    prompt(f"two: {VISION} and {VISION} end"),
                ],
                [a, b, c],
            ),
            "mrope",
        ),
        "gen2embed scheme, bare image pads + text-only row": (
            encode(
                processor, [prompt("<|image_pad|>\nRepresent the given image."), prompt("plain text")], [b]
            ),
            "gen2embed",
        ),
    }


CASES = [
    "text-only, right padding",
    "text-only, left padding",
    "one image",
    "several images of different sizes + text-only rows",
    "gen2embed scheme, bare image pads + text-only row",
]


# "text-only, right padding" and the several-images batch are test_backbones.py's forward case for
# every backbone (the same prompts; images of different sizes); the M-RoPE positions of all cases are
# checked below.
@pytest.mark.parametrize("case", [c for c in CASES if c not in ("text-only, right padding",
                                                                "several images of different sizes + text-only rows")])
def test_forward_matches_transformers(case, processor, hf_model, jax_model):
    batch, scheme = batches(processor)[case]
    positions = rope_index(
        batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"), jax_model.config, scheme
    )
    if scheme == "mrope":
        reference_positions = hf_rope_index(hf_model, batch)
    else:
        reference_positions = sequential_positions(batch["attention_mask"])
    ref = hf_hidden_states(hf_model, batch, reference_positions)
    out = np.asarray(
        jax_model(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("pixel_values"),
            batch.get("image_grid_thw"),
            position_ids=positions,
        )
    )
    diff = real_token_diff(ref, out, batch["attention_mask"])
    cosine = pooled_cosine(ref, out, batch["attention_mask"])
    report(
        case, max_abs_diff=diff, pooled_one_minus_cosine=1.0 - cosine, ref_max_abs=float(np.abs(ref).max())
    )
    assert out.shape == ref.shape
    assert diff <= ATOL
    assert cosine >= MIN_COSINE


def test_default_positions_are_mrope(processor, hf_model, jax_model):
    """Without position_ids both models derive M-RoPE positions themselves (transformers' default)."""
    batch, _ = batches(processor)["several images of different sizes + text-only rows"]
    with torch.no_grad():
        ref = hf_model.model(**{k: torch.as_tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    out = np.asarray(
        jax_model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
    )
    diff = real_token_diff(ref, out, batch["attention_mask"])
    report("default (derived) M-RoPE positions", max_abs_diff=diff)
    assert diff <= ATOL


def test_all_hidden_states_match(processor, hf_model, jax_model):
    batch, _ = batches(processor)["one image"]
    positions = hf_rope_index(hf_model, batch)
    _, ref_all = hf_hidden_states(hf_model, batch, positions, output_hidden_states=True)
    last, out_all = jax_model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["image_grid_thw"],
        position_ids=positions,
        output_hidden_states=True,
    )
    assert len(out_all) == len(ref_all) == jax_model.config.text.num_hidden_layers + 1
    diffs = [real_token_diff(r, o, batch["attention_mask"]) for r, o in zip(ref_all, out_all)]
    report("every layer's hidden states", max_abs_diff=max(diffs))
    np.testing.assert_array_equal(np.asarray(out_all[-1]), np.asarray(last))
    assert max(diffs) <= ATOL


def test_vision_tower_alone(processor, hf_model, jax_model):
    images = [random_image(56, 56, 4), random_image(84, 112, 5), random_image(140, 84, 6)]
    batch = encode(processor, [prompt(VISION)] * 3, images)
    with torch.no_grad():
        ref = hf_model.model.visual(
            torch.as_tensor(batch["pixel_values"]), grid_thw=torch.as_tensor(batch["image_grid_thw"])
        ).pooler_output.numpy()
    out = np.asarray(jax_model.image_features(batch["pixel_values"], batch["image_grid_thw"]))
    diff = float(np.abs(ref - out).max())
    report(
        "vision tower alone, 3 images of different sizes",
        max_abs_diff=diff,
        ref_max_abs=float(np.abs(ref).max()),
    )
    assert out.shape == ref.shape
    assert diff <= ATOL


@pytest.mark.parametrize("case", [c for c in CASES if "gen2embed" not in c])
def test_rope_index_equals_transformers(case, processor, hf_model, jax_model):
    batch, _ = batches(processor)[case]
    ours = rope_index(
        batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"), jax_model.config, "mrope"
    )
    ref = hf_rope_index(hf_model, batch)
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_array_equal(ours[:, real], ref[:, real])
