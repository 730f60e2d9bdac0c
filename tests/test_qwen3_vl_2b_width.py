"""Qwen3-VL at the real 2B widths (random weights): 2 decoder layers and 2 vision blocks, a DeepStack tap
after block 0 (so decoder layer 1 gets no DeepStack feature), the 48x48 learned position table.

Every width is Qwen3-VL-2B-Instruct's (``QWEN3_VL_2B``: vision 1024 wide, 16 heads of 64, GELU-tanh MLP
4096; decoder 2048 wide, 16 heads of 128 with q/k norms, 8 KV heads, MLP 6144, interleaved M-RoPE sections
24/20/20, rope theta 5e6) except the vocabulary, which is the tiny tokenizer's: a bigger embedding table
changes no arithmetic, only the test's time and memory. The image (12x18 patches) samples the position
table down.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow  # 2B widths: `pytest -m "not slow"` leaves it out

from conftest import assert_parity  # noqa: E402
from hf_reference import hf_hidden_states, hf_rope_index, load_hf_model  # noqa: E402
from test_qwen2_vl_parity import VISION, encode, prompt, random_image  # noqa: E402

from g2e_jax import models  # noqa: E402
from g2e_jax.models.common.hf_files import special_token_ids  # noqa: E402
from g2e_jax.models.qwen2_vl.config import with_token_ids  # noqa: E402
from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor  # noqa: E402
from g2e_jax.models.qwen3_vl import QWEN3_VL_2B, rope_index  # noqa: E402


def test_qwen3_vl_2b_widths(tmp_path):
    c = QWEN3_VL_2B
    ids = special_token_ids()
    text = dataclasses.replace(c.text, num_hidden_layers=2, vocab_size=ids["vocab_size"], bos_token_id=None,
                               eos_token_id=ids["im_end"])  # fmt: skip
    vision = dataclasses.replace(c.vision, depth=2, deepstack_visual_indexes=(0,))
    cfg = with_token_ids(c.replace(text=text, vision=vision))
    path = models.make_tiny(tmp_path / "qwen3_vl_2b_width", arch="qwen3_vl", seed=1, config=cfg)
    processor = load_hf_processor(path)
    batch = encode(
        processor,
        [prompt(f"{VISION}Represent the given image in one word."), prompt("text only")],
        [random_image(192, 288, 7)],
    )
    assert batch["image_grid_thw"].tolist() == [[1, 12, 18]]
    hf_model = load_hf_model(path)
    hf_positions = hf_rope_index(hf_model, batch)
    ref = hf_hidden_states(hf_model, batch, hf_positions)
    del hf_model
    model = models.load(path, progress=False)
    assert model.config == cfg
    positions = rope_index(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], cfg, "mrope")
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_array_equal(positions[:, real], hf_positions[:, real])
    out = np.asarray(model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                           batch["image_grid_thw"], positions))  # fmt: skip
    assert_parity("Qwen3-VL-2B widths, 2 layers + 2 vision blocks (DeepStack tap after block 0)", ref, out,
                  batch["attention_mask"])  # fmt: skip
