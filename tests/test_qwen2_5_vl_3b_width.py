"""Qwen2.5-VL at the real 3B widths (random weights): 1 decoder layer and 2 vision blocks, the first
windowed (112-pixel windows: 8x8 patches) and the second listed in ``fullatt_block_indexes``.

Every width is Qwen2.5-VL-3B's (``QWEN2_5_VL_3B``: vision 1280 wide, 16 heads of 80, SwiGLU 3420;
decoder 2048 wide, 16 heads of 128, 2 KV heads, MLP 11008, M-RoPE sections 16/24/24) except the
vocabulary, which is the tiny tokenizer's: a bigger embedding table changes no arithmetic, only the
test's time and memory. The image (12x18 patches, 6x9 merged) spans 2x3 windows, none of the
bottom or right ones whole.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow  # 3B widths: `pytest -m "not slow"` leaves it out

from conftest import assert_parity  # noqa: E402
from hf_reference import hf_hidden_states, hf_rope_index, load_hf_model  # noqa: E402
from test_qwen2_vl_parity import VISION, encode, prompt, random_image  # noqa: E402

from g2e_jax import models  # noqa: E402
from g2e_jax.models.qwen2_5_vl import QWEN2_5_VL_3B, rope_index  # noqa: E402
from g2e_jax.models.qwen2_vl.config import with_token_ids  # noqa: E402
from g2e_jax.models.common.hf_files import special_token_ids  # noqa: E402
from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor  # noqa: E402


def test_qwen2_5_vl_3b_widths(tmp_path):
    c = QWEN2_5_VL_3B
    ids = special_token_ids()
    text = dataclasses.replace(c.text, num_hidden_layers=1, vocab_size=ids["vocab_size"], bos_token_id=None,
                               eos_token_id=ids["im_end"])  # fmt: skip
    vision = dataclasses.replace(c.vision, depth=2, fullatt_block_indexes=(1,))
    cfg = with_token_ids(c.replace(text=text, vision=vision))
    path = models.make_tiny(tmp_path / "qwen2_5_vl_3b_width", arch="qwen2_5_vl", seed=1, config=cfg)
    processor = load_hf_processor(path)
    batch = encode(
        processor,
        [prompt(f"{VISION}Represent the given image in one word."), prompt("text only")],
        [random_image(168, 252, 7)],
    )
    assert batch["image_grid_thw"].tolist() == [[1, 12, 18]]
    hf_model = load_hf_model(path)
    ref = hf_hidden_states(hf_model, batch, hf_rope_index(hf_model, batch))
    del hf_model
    model = models.load(path, progress=False)
    assert model.config == cfg
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
    assert_parity(
        "Qwen2.5-VL-3B widths, 1 layer + 2 vision blocks (windowed, full)", ref, out, batch["attention_mask"]
    )
