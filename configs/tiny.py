"""Fine-tuning the tiny model on the synthetic set: the demo's and the tests' training config.

``g2e-jax train --config configs/tiny.py --workdir runs/tiny --config.model.path=DIR
--config.data.clusters_dir=MINED --config.data.image_dir=SYNTHETIC/images``
"""

from g2e_jax.data.synthetic import SUBSETS
from g2e_jax.train.trainer import training_config


def get_config():
    c = training_config(subsets=tuple(SUBSETS))
    c.max_len = 256
    c.mine.top_k = 3
    c.mine.pool_mult = 2
    c.mine.classification_subsets = ("SynShape", "SynColor")
    t = c.train
    t.steps = 60
    t.clusters_per_batch = 4  # up to 16 pairs
    t.learning_rate = 2e-3
    t.warmup_steps = 5
    t.grad_cache = True
    t.rows_per_cell = 4
    t.users = 160
    t.patches_per_cell = 4 * 36  # four 84 x 84 images
    t.max_patches_per_image = 64
    t.log_every = 5
    t.checkpoint_every = 20
    c.adapter.kind = "full"  # the tiny model is random: adapt everything
    c.adapter.dropout = 0.0
    return c
