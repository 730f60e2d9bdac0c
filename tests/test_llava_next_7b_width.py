"""LLaVA-NeXT at llava-v1.6-mistral-7b's real widths (random weights): 1 decoder layer and 2 CLIP layers.

Every width is ``LLAVA_V1_6_MISTRAL_7B``'s (CLIP-L/14 on 336-pixel tiles: 1024 wide, 16 heads, MLP 4096,
24x24 patches; Mistral: 4096 wide, 32 heads of 128, 8 KV heads, MLP 14336, RoPE theta 1e6; the
llava-v1.6 pinpoints) except the depths and the vocabulary (the tiny tokenizer's). The image (333 x
1001) selects the 1x3 grid of 336-pixel tiles, with rows cropped.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow  # 7B widths: `pytest -m "not slow"` leaves it out

from conftest import assert_parity  # noqa: E402
from hf_reference import load_hf_model  # noqa: E402
from test_llava_next_parity import encode, hf_hidden, inst, our_hidden, random_image  # noqa: E402

from g2e_jax import models  # noqa: E402
from g2e_jax.models.llava_next import LLAVA_V1_6_MISTRAL_7B, anyres  # noqa: E402
from g2e_jax.models.llava_next.hf_files import load_hf_processor, special_token_ids  # noqa: E402


def test_llava_v1_6_mistral_7b_widths(tmp_path):
    c = LLAVA_V1_6_MISTRAL_7B
    ids = special_token_ids()
    text = dataclasses.replace(
        c.text,
        num_hidden_layers=1,
        vocab_size=ids["vocab_size"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
    )
    cfg = c.replace(text=text, vision=dataclasses.replace(c.vision, depth=2), image_token_id=ids["image"])
    path = models.make_tiny(tmp_path / "llava_7b_width", arch="llava_next", seed=1, config=cfg)
    processor = load_hf_processor(path)
    image = random_image(333, 1001, 7)
    assert anyres.tile_grid(333, 1001, cfg) == (1, 3)
    batch = encode(
        processor, [inst("<image>\nRepresent the given image in one word."), inst("text only")], [image]
    )
    hf_model = load_hf_model(path)
    ref = hf_hidden(hf_model, batch)
    del hf_model
    model = models.load(path, progress=False)
    assert model.config == cfg
    out = our_hidden(model, batch)
    assert_parity(
        "LLaVA-NeXT llava-v1.6-mistral-7b widths, 1 layer + 2 CLIP layers", ref, out, batch["attention_mask"]
    )
