"""One case at the real Qwen2-VL-2B widths (1 decoder layer, 1 vision block, random weights)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow  # 2B widths: `pytest -m "not slow"` leaves it out

from conftest import assert_parity  # noqa: E402
from hf_reference import hf_hidden_states, hf_rope_index, load_hf_model  # noqa: E402
from test_qwen2_vl_parity import VISION, encode, prompt, random_image  # noqa: E402

from g2e_jax.models.qwen2_vl import Qwen2VLConfig, TextConfig, VisionConfig, load, rope_index  # noqa: E402
from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor  # noqa: E402
from g2e_jax.models.qwen2_vl.tiny import make_tiny, with_token_ids  # noqa: E402

QWEN2_VL_2B_ONE_LAYER = Qwen2VLConfig(
    text=TextConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=1,
                    num_attention_heads=12, num_key_value_heads=2, mrope_section=(16, 24, 24), rope_theta=1e6),
    vision=VisionConfig(depth=1, embed_dim=1280, num_heads=16, mlp_ratio=4, out_hidden_size=1536),
    tie_word_embeddings=True,
)  # fmt: skip


def test_qwen2_vl_2b_widths(tmp_path):
    cfg = with_token_ids(QWEN2_VL_2B_ONE_LAYER)
    path = make_tiny(tmp_path / "qwen2vl_2b_width", seed=1, config=cfg)
    assert load(path, progress=False).config == cfg
    processor = load_hf_processor(path)
    batch = encode(
        processor,
        [prompt(f"{VISION}Represent the given image in one word."), prompt("text only")],
        [random_image(84, 112, 7)],
    )
    hf_model = load_hf_model(path)
    ref = hf_hidden_states(hf_model, batch, hf_rope_index(hf_model, batch))
    del hf_model
    model = load(path, progress=False)
    positions = rope_index(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], cfg, "mrope")
    out = np.asarray(
        model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["image_grid_thw"],
            positions,
        )
    )
    assert_parity("Qwen2-VL-2B widths, 1 layer + 1 vision block", ref, out, batch["attention_mask"])
