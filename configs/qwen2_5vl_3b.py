"""Qwen2.5-VL-3B-Instruct (``--config.model.path=/models/Qwen2.5-VL-3B-Instruct``): zero-shot MMEB and
SaHa fine-tuning with the paper's reference recipe (the same as for Qwen2-VL, DESIGN.md §1).

- Zero-shot: ``g2e-jax eval --config configs/qwen2_5vl_3b.py:zero_shot --config.model.path=...
  --config.data.root=/data/MMEB-eval --config.data.image_dir=... --config.output_dir=runs/saha_3b/zero_shot``
  (``:plain`` for the plain-prompt baseline). bfloat16, the released weights' dtype; the official
  eval settings (max length 2048, ``random`` images).
- SaHa (default preset): ``g2e-jax mine --config configs/qwen2_5vl_3b.py --config.model.path=...
  --config.data.root=/data/MMEB-train --config.data.image_dir=... --config.mine.output_dir=runs/saha_3b/mined``,
  then ``g2e-jax train --config configs/qwen2_5vl_3b.py --workdir runs/saha_3b --config.model.path=...
  --config.data.clusters_dir=runs/saha_3b/mined --config.data.image_dir=...``: DoRA r=8 (alpha 64, dropout
  0.1) on the decoder's q/k/v/o and down projections, lr 5e-5 linear with 100 warm-up steps, 1,500
  steps, 16 clusters per device on 8 devices mixed across subsets, GradCache chunks of 4, 448 x 448
  images, max length 1024, bf16; mining at its own settings (``mine.*``: ``diverse_instruction`` rows,
  max length 2048, ``random`` images, batches of 16). The 7.5 GB of bf16 weights fit replicated on
  every device.
- ``:filtered`` (SaHa with this project's in-step false-negative filters), ``:inbatch`` (the in-batch
  baseline: plain rows, ``--config.data.root=/data/MMEB-train``).
"""

from g2e_jax.config_utils import sibling_config


def get_config(preset: str = "saha"):
    return sibling_config(__file__, "recipes.py", preset)
