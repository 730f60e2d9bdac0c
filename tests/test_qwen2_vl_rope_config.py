"""Host-side rope index and config validation, independent of PyTorch."""

from __future__ import annotations

import re

import numpy as np
import pytest

from g2e_jax.models.qwen2_vl import Qwen2VLConfig, TextConfig, rope_index
from g2e_jax.models.qwen2_vl.tiny import tiny_config

CFG = tiny_config()
IMG = CFG.image_token_id


def test_mrope_positions_of_one_image_by_hand():
    # 2 text tokens, a 4x6-patch image (2x3 merged tokens), 2 text tokens.
    ids = np.array([[5, 6] + [IMG] * 6 + [7, 8]])
    pos = rope_index(ids, None, [[1, 4, 6]], CFG, "mrope")
    np.testing.assert_array_equal(pos[0, 0], [0, 1, 2, 2, 2, 2, 2, 2, 5, 6])  # time
    np.testing.assert_array_equal(pos[1, 0], [0, 1, 2, 2, 2, 3, 3, 3, 5, 6])  # height
    np.testing.assert_array_equal(pos[2, 0], [0, 1, 2, 3, 4, 2, 3, 4, 5, 6])  # width


def test_adjacent_images_are_split_by_their_sizes():
    ids = np.array([[IMG] * 4 + [IMG] * 1 + [9]])
    pos = rope_index(ids, None, [[1, 4, 4], [1, 2, 2]], CFG, "mrope")
    np.testing.assert_array_equal(pos[:, 0, 4], [2, 2, 2])  # second image starts after max(2, 2)
    np.testing.assert_array_equal(pos[:, 0, 5], [3, 3, 3])


def test_gen2embed_is_sequential_over_real_tokens():
    ids = np.array([[0, 0, 5, IMG, IMG, IMG, IMG, 6], [5, 6, 7, 8, 9, 0, 0, 0]])
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]])
    pos = rope_index(ids, mask, [[1, 4, 4]], CFG, "gen2embed")
    assert pos.shape == (3, 2, 8)
    for axis in range(3):
        np.testing.assert_array_equal(pos[axis][mask.astype(bool)], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4])


def test_rope_index_errors():
    with pytest.raises(ValueError, match="unknown rope scheme"):
        rope_index(np.zeros((1, 3), int), None, None, CFG, "alibi")
    with pytest.raises(ValueError, match=re.escape("more <|image_pad|> runs than rows in image_grid_thw")):
        rope_index(np.array([[IMG] * 4]), None, None, CFG, "mrope")
    with pytest.raises(ValueError, match="is shorter"):
        rope_index(np.array([[IMG] * 3 + [1]]), None, [[1, 4, 4]], CFG, "mrope")
    with pytest.raises(ValueError, match="has 2 images but input_ids hold 1"):
        rope_index(np.array([[IMG] * 4]), None, [[1, 4, 4], [1, 4, 4]], CFG, "mrope")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen2VLConfig(text=TextConfig(mrope_section=(16, 24, 23)), vision=CFG.vision.__class__())
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Qwen2VLConfig(text=TextConfig(num_key_value_heads=5))
    with pytest.raises(ValueError, match="vision_config.hidden_size"):
        Qwen2VLConfig(text=TextConfig(hidden_size=1536), vision=CFG.vision)
