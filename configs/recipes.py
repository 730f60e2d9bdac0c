"""The recipes every backbone config file returns, in one place: ``:saha`` (the paper's run: mining
and training), ``:filtered`` (ours: the same with in-step false-negative filters), ``:inbatch`` (the
paper's in-batch baseline), ``:zero_shot`` and ``:plain`` (MMEB evaluation with either prompt at the
official eval settings, in the released weights' bf16).

A backbone file reads it with ``g2e_jax.config_utils.sibling_config(__file__, "recipes.py", preset)``
and changes only what its backbone needs (e.g. configs/llava_next_mistral_7b.py's sequence limits).
The defaults these start from are the schema in ``g2e_jax.train.config.training_config``.
"""

from g2e_jax.eval.mmeb import eval_config
from g2e_jax.mine import MMEB_TRAIN_SUBSETS
from g2e_jax.train.config import training_config


def saha():
    """The paper's SaHa recipe as the official commands run it (README of Gen2Embed), the same for
    Qwen2-VL-2B/7B and Qwen2.5-VL. Each stage has its own settings:

    - ``g2e-jax mine`` (``cli.sample_mmeb``): the ``diverse_instruction`` rows, max length 2048,
      ``random`` (aspect-adaptive) images, batches of 16, bf16, top_k 15 x pool_mult 3.
    - ``g2e-jax train`` (``cli.train``): the mined clusters, mixed across subsets in every batch; DoRA
      r=8 (alpha 64, dropout 0.1, Gaussian init) on the decoder's q/k/v/o and down projections; lr
      5e-5 linear with 100 warm-up steps, 1,500 steps; 16 clusters per device on 8 devices; GradCache
      chunks of 4; 448 x 448 (``mid_low``) images; max length 1024; bf16; the plain InfoNCE loss at
      temperature 0.02 (no false-negative filters: see ``filtered``).
    - ``g2e-jax eval`` (``cli.evaluate``): ``configs/mmeb_eval.py`` / the ``zero_shot`` preset
      (max length 2048, ``random`` images).
    """
    c = training_config(subsets=MMEB_TRAIN_SUBSETS)
    c.model.dtype = "bfloat16"
    c.image_resolution = "mid_low"
    c.max_len = 1024
    c.data.split = "original"
    c.data.num_sample_per_subset = 100_000  # official flag; applies to plain rows only
    m = c.mine
    m.top_k = 15
    m.pool_mult = 3
    m.split = "diverse_instruction"
    m.max_len = 2048
    m.image_resolution = "random"
    m.batch_size = 16
    t = c.train
    t.steps = 1500
    t.clusters_per_batch = 128
    t.batch_subsets = "mixed"
    t.learning_rate = 5e-5
    t.warmup_steps = 100
    t.temperature = 0.02
    t.grad_cache = True
    t.rows_per_cell = 4
    t.mask_same_target = False
    t.mask_same_query = False
    c.adapter.kind = "dora"
    c.adapter.rank = 8
    c.adapter.alpha = 64.0
    c.adapter.dropout = 0.1
    return c


def filtered():
    """The SaHa recipe with this project's in-step false-negative filters on (not the paper's run):
    candidates equal to the anchor's positive, and rows of the same query, are masked in the loss."""
    c = saha()
    c.train.mask_same_target = True
    c.train.mask_same_query = True
    return c


def inbatch():
    """The paper's in-batch negative baseline: plain MMEB-train rows (``original`` split, each row its
    own cluster, at most 100,000 per subset as ``shuffle(seed=42).select(range(n))``), drawn at random
    across subsets, with the SaHa recipe's optimiser, schedule, steps and encode settings. As with the
    official command's ``--per_device_train_batch_size 16`` (no hard negatives), a batch is 16 rows
    per device: 128 pairs on 8 devices. Needs ``data.root`` (MMEB-train), not mined clusters."""
    c = saha()
    c.data.source = "mmeb"
    return c


def zero_shot(prompt: str = "hierarchical"):
    """MMEB evaluation at the official eval settings, in the released weights' bf16."""
    c = eval_config(prompt)
    c.model.dtype = "bfloat16"
    return c


RECIPES = {
    "saha": saha,
    "filtered": filtered,
    "inbatch": inbatch,
    "zero_shot": zero_shot,
    "plain": lambda: zero_shot("plain"),
}


def get_config(preset: str = "saha"):
    if preset not in RECIPES:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(RECIPES)}")
    return RECIPES[preset]()
