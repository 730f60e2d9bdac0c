"""SaHa on Qwen2-VL-7B: the same recipe as configs/qwen2vl_2b_saha.py at 7B.

Needs the 7B weights (``--config.model.path=/models/Qwen2-VL-7B-Instruct``). With 8 devices of
80 GB, bf16 weights (15 GB) fit replicated; on smaller devices shard them with
``--config.mesh.fsdp=8`` (parameters split across the data-parallel devices).
"""

from g2e_jax.mine import MMEB_TRAIN_SUBSETS
from g2e_jax.train.trainer import training_config


def get_config():
    c = training_config(subsets=MMEB_TRAIN_SUBSETS)
    c.model.dtype = "bfloat16"
    c.image_resolution = "mid_low"
    c.mine.top_k = 15
    c.mine.pool_mult = 3
    t = c.train
    t.steps = 1500
    t.clusters_per_batch = 128
    t.learning_rate = 5e-5
    t.warmup_steps = 100
    t.grad_cache = True
    t.rows_per_cell = 4
    c.adapter.kind = "dora"
    return c
