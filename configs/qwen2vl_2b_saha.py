"""SaHa on Qwen2-VL-2B as the official commands run it
(values: configs/recipes.py, ``saha``).

1. Mine: ``g2e-jax mine --config configs/qwen2vl_2b_saha.py --config.model.path=/models/Qwen2-VL-2B-Instruct
   --config.data.root=/data/MMEB-train --config.data.image_dir=/data/MMEB-train/images
   --config.mine.output_dir=runs/saha_2b/mined``
2. Train: ``g2e-jax train --config configs/qwen2vl_2b_saha.py --workdir runs/saha_2b
   --config.model.path=... --config.data.clusters_dir=runs/saha_2b/mined --config.data.image_dir=...``
3. Evaluate: ``g2e-jax eval --config configs/qwen2vl_2b_saha.py:zero_shot --config.model.path=...``
   (the base weights, or the training workdir), ``:plain`` for the plain-prompt baseline.

Each stage has its own settings in the one config. ``mine.*``: the ``diverse_instruction`` rows, max
length 2048, ``random`` images, batches of 16, top_k 15 x pool_mult 3. Training (top level and
``train.*``): DoRA r=8 (alpha 64, dropout 0.1, Gaussian init) on the decoder's q/k/v/o and down
projections; lr 5e-5, linear, 100 warm-up steps, 1,500 steps; 16 clusters (<= 256 pairs) per device
on 8 devices, mixed across subsets; GradCache chunks of 4; 448 x 448 images; max length 1024; bf16;
the plain InfoNCE loss (the official one). ``:filtered`` is the same with this project's in-step
false-negative filters on (``train.mask_same_target``, ``train.mask_same_query``); ``:inbatch`` the
in-batch baseline (configs/qwen2vl_2b_inbatch.py).
"""

from g2e_jax.config_utils import sibling_config


def get_config(preset: str = "saha"):
    return sibling_config(__file__, "recipes.py", preset)
