"""The prepared row: one row of text and/or image as the host hands it to the encode program.

Made by ``Preprocessor.prepare`` (``g2e_jax.preprocess``), stored and read back by the prepared
dataset (``g2e_jax.data.prepared``), batched by ``preprocess.collate``; a plain format, so that
the data readers need nothing above them."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class PreparedRow:
    """One row, ready for batching: everything the jitted encode needs from the host."""

    user_ids: np.ndarray  # [U] int32, image pads expanded
    user_pos: np.ndarray | None  # [3, U] M-RoPE positions relative to the segment start (mrope only)
    next_pos: int  # first position after the user segment, relative to its start
    patches: np.ndarray | None  # [P, C*T*p*p] float32 (LLaVA-NeXT: tiles [T, C*S*S])
    grid_thw: np.ndarray | None  # [3] (LLaVA-NeXT: the anyres layout, see llava_next.anyres.image_layout)
    truncated_from: int = 0  # original user-segment length when truncated, else 0
