"""SaHa on Qwen2-VL-2B: the paper's reference run (DESIGN.md §1).

1. Mine: ``g2e-jax mine --config configs/qwen2vl_2b_saha.py --config.model.path=/models/Qwen2-VL-2B-Instruct
   --config.data.root=/data/MMEB-train --config.data.image_dir=/data/MMEB-train/images
   --config.mine.output_dir=runs/saha_2b/mined``
2. Train: ``g2e-jax train --config configs/qwen2vl_2b_saha.py --workdir runs/saha_2b
   --config.model.path=... --config.data.clusters_dir=runs/saha_2b/mined --config.data.image_dir=...``

Reference hyper-parameters: DoRA r=8 (alpha 64, dropout 0.1, Gaussian init) on the decoder's
q/k/v/o and down projections; lr 5e-5, linear, 100 warm-up steps, 1,500 steps; 16 clusters
(<= 256 pairs) per device on 8 devices; GradCache chunks of 4; 448 x 448 images; max length 1024; bf16.
"""

from g2e_jax.mine import MMEB_TRAIN_SUBSETS
from g2e_jax.train.trainer import training_config


def get_config():
    c = training_config(subsets=MMEB_TRAIN_SUBSETS)
    c.model.dtype = "bfloat16"
    c.image_resolution = "mid_low"  # 448 x 448
    c.mine.top_k = 15
    c.mine.pool_mult = 3
    t = c.train
    t.steps = 1500
    t.clusters_per_batch = 128  # 16 per device x 8 devices
    t.learning_rate = 5e-5
    t.warmup_steps = 100
    t.grad_cache = True
    t.rows_per_cell = 4
    c.adapter.kind = "dora"
    return c
