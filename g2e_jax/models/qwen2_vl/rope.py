"""Text position ids on the host (numpy), computed once per row during preprocessing.

Two schemes (DESIGN.md §1):
  * ``mrope``: Qwen2-VL's 3-D multimodal positions; equal to transformers 5.x
    ``Qwen2VLModel.get_rope_index`` on every real (attention_mask == 1) slot.
  * ``gen2embed``: plain sequential positions over the real tokens (t = h = w = index), which is
    what the official Gen2Embed code computes for bare ``<|image_pad|>`` runs.
Padded slots get position 1, as transformers does; their value never reaches a real token.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("mrope", "gen2embed")


def rope_index(input_ids, attention_mask, image_grid_thw, config, scheme: str = "mrope") -> np.ndarray:
    """Returns ``[3, B, L]`` int32 positions for a batch.

    ``image_grid_thw`` lists the images in row-major order of their ``<|image_pad|>`` runs, as the
    HF processor returns it. Consecutive pad tokens are split into images by each image's merged
    token count, so two images with nothing between them are still two images.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown rope scheme {scheme!r}; expected one of {SCHEMES}")
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    mask = (
        np.ones_like(input_ids, dtype=bool)
        if attention_mask is None
        else np.asarray(attention_mask).astype(bool)
    )
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {input_ids.shape}")
    batch, length = input_ids.shape
    positions = np.ones((3, batch, length), dtype=np.int32)
    if scheme == "gen2embed":
        seq = np.cumsum(mask, axis=1, dtype=np.int64) - 1
        positions[:] = np.where(mask, seq, 1)[None]
        return positions

    merge = config.vision.spatial_merge_size
    grids = (
        np.zeros((0, 3), np.int64)
        if image_grid_thw is None
        else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    )
    next_image = 0
    for b in range(batch):
        ids = input_ids[b][mask[b]]
        row = np.empty((3, ids.shape[0]), dtype=np.int64)
        is_image = ids == config.image_token_id
        i, pos = 0, 0
        while i < ids.shape[0]:
            if not is_image[i]:
                j = i
                while j < ids.shape[0] and not is_image[j]:
                    j += 1
                row[:, i:j] = pos + np.arange(j - i)
                pos += j - i
                i = j
                continue
            if next_image >= grids.shape[0]:
                raise ValueError(
                    f"row {b}: more <|image_pad|> runs than rows in image_grid_thw ({grids.shape[0]})"
                )
            t, h, w = (int(x) for x in grids[next_image])
            gh, gw = h // merge, w // merge
            n = t * gh * gw
            if i + n > ids.shape[0] or not is_image[i : i + n].all():
                raise ValueError(
                    f"row {b}: image {next_image} has grid {[t, h, w]} = {n} tokens, but its "
                    f"<|image_pad|> run at position {i} is shorter"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            row[0, i : i + n] = tt.reshape(-1) + pos
            row[1, i : i + n] = hh.reshape(-1) + pos
            row[2, i : i + n] = ww.reshape(-1) + pos
            pos += max(gh, gw)
            next_image += 1
            i += n
        positions[:, b, mask[b]] = row
    if next_image != grids.shape[0]:
        raise ValueError(
            f"image_grid_thw has {grids.shape[0]} images but input_ids hold {next_image} image runs"
        )
    return positions
