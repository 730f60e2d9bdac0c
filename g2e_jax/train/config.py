"""The training config's schema (every section a training config has, with its defaults) and the
recipes that the config files in ``configs/`` return (``backbone_recipe``): the paper's SaHa run,
its in-batch baseline, and our filtered variant."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from g2e_jax.adapters.lora import AdapterConfig
from g2e_jax.config_sections import (
    data_section,
    distributed_section,
    mesh_section,
    model_section,
    prompt_section,
)


def train_section() -> ml_collections.ConfigDict:
    """Training hyper-parameters (defaults: the reference run, DESIGN.md §1)."""
    t = ml_collections.ConfigDict()
    t.steps = 1500
    t.seed = 0
    t.clusters_per_batch = 128  # global: 16 clusters per device on 8 devices
    # "mixed": clusters of every subset drawn at random into each batch (the official run: Hugging
    # Face's random sampler); "same": every batch from one subset.
    t.batch_subsets = "mixed"
    t.learning_rate = 5e-5
    t.warmup_steps = 100
    t.weight_decay = 0.0
    t.max_grad_norm = 1.0
    t.temperature = 0.02
    t.grad_cache = True
    t.rows_per_cell = 4  # GradCache chunk size per device (reference: 4)
    # none | layers (each decoder layer and vision block checkpointed: the backward keeps their inputs)
    # | layers_dots (and their projections' outputs) | full / dots (a chunk's whole forward): step.py.
    t.remat = "none"
    t.users = 960  # user-segment tokens per row at most (max_len minus the template)
    t.patches_per_cell = 4096  # packed image patches per cell and side at most
    # Each step's sides padded to buckets of what they hold (a few programs), not to the maxima above.
    t.shape_buckets = True
    # Bucket sizes per doubling: padding adds under 1/4 of a side; each new size compiles once.
    t.bucket_steps = 4
    # The run's largest batch fitted (in buckets) to the data's longest rows, by one pass over every
    # row at start (small data sets), instead of users / patches_per_cell: without shape buckets every
    # step has that shape; with them it is the shape compiled and memory-checked before step one.
    t.shape_from_data = False
    t.max_patches_per_image = 1024  # 448 x 448 images
    # In-step false-negative filters (ours; the official loss has none: off in the paper recipe).
    t.mask_same_target = False
    t.mask_same_query = False
    t.fn_query_threshold = config_dict.placeholder(float)
    t.fn_margin = config_dict.placeholder(float)
    t.hard_k = config_dict.placeholder(int)
    t.prefix_cache = True  # the system segment once per chunk, not once per row (same loss)
    t.log_every = 10
    t.checkpoint_every = 100
    t.keep_checkpoints = 3
    t.async_checkpoint = True
    # Non-finite steps change nothing; this many in a row stop the run with a checkpoint (0: never stop).
    t.max_bad_steps = 10
    # Per-device memory the compiled step must fit (GiB) where the device reports none (CPU); on
    # GPU/TPU the device's own limit is used. None: no check.
    t.device_memory_gb = config_dict.placeholder(float)
    return t


def adapter_section() -> ml_collections.ConfigDict:
    a = ml_collections.ConfigDict()
    a.kind = "dora"  # lora | dora | full
    a.rank = 8
    a.alpha = 64.0
    a.dropout = 0.1
    a.targets = AdapterConfig().targets
    a.init = "gaussian"
    # A PEFT LoRA/DoRA folder to start from: it sets kind, rank, alpha and targets (dropout stays above).
    a.init_from = config_dict.placeholder(str)
    return a


def eval_section() -> ml_collections.ConfigDict:
    """Periodic evaluation on a held-out MMEB-format set (off unless ``every`` and ``root`` are set)."""
    e = ml_collections.ConfigDict()
    e.every = 0  # steps between evaluations (also at the last step); 0: never
    # As `g2e-jax eval`'s data fields; subsets (): every subset of the groups table.
    return data_section("root", "image_dir", "subsets", "groups_file", into=e)


def training_config(subsets=()) -> ml_collections.ConfigDict:
    """Every section a training config has; the config files change what differs."""
    from g2e_jax.mine import mine_section

    c = ml_collections.ConfigDict()
    # dtype: the parameters (master weights); adapter: mine's; shard_weights: mining's
    c.model = model_section(dtype="float32", compute_dtype=True, shard_weights=True)
    c.prompt = prompt_section()
    c.data = data_section(
        "source", "clusters_dir", "prepared_dir", "root", "image_dir", "split", "subsets",
        "num_sample_per_subset", "bad_rows", "check", "check_workers", "check_cache", subsets=tuple(subsets),
    )  # fmt: skip
    # data.split: plain rows (mmeb); `g2e-jax mine` reads mine.split
    # Training's encode settings (and the periodic eval's); `g2e-jax mine` uses its own mine.* ones.
    c.max_len = 1024
    c.image_resolution = config_dict.FieldReference(None, field_type=str)
    c.batch_size = 16  # encode batch (mining, eval), over all devices
    c.mine = mine_section()
    c.train = train_section()
    c.adapter = adapter_section()
    c.mesh = mesh_section()
    c.distributed = distributed_section()
    c.eval = eval_section()
    return c


RECIPES = ("saha", "filtered", "inbatch", "zero_shot", "plain")


def backbone_recipe(preset: str = "saha") -> ml_collections.ConfigDict:
    """A backbone config file's presets: ``saha`` (mining and training, ``saha_reference_config``),
    ``filtered`` (the same with our in-step false-negative filters on), ``inbatch`` (the paper's
    in-batch baseline, ``inbatch_reference_config``), ``zero_shot`` and ``plain`` (MMEB evaluation
    with either prompt at the official eval settings, in the released weights' bf16)."""
    from g2e_jax.eval.mmeb import eval_config

    if preset == "saha":
        return saha_reference_config()
    if preset == "filtered":
        return filtered_config()
    if preset == "inbatch":
        return inbatch_reference_config()
    if preset in ("zero_shot", "plain"):
        c = eval_config("hierarchical" if preset == "zero_shot" else "plain")
        c.model.dtype = "bfloat16"
        return c
    raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(RECIPES)}")


def saha_reference_config() -> ml_collections.ConfigDict:
    """The paper's SaHa recipe as the official commands run it (README of Gen2Embed), the same for
    Qwen2-VL-2B/7B and Qwen2.5-VL. Each stage has its own settings:

    - ``g2e-jax mine`` (``cli.sample_mmeb``): the ``diverse_instruction`` rows, max length 2048,
      ``random`` (aspect-adaptive) images, batches of 16, bf16, top_k 15 x pool_mult 3.
    - ``g2e-jax train`` (``cli.train``): the mined clusters, mixed across subsets in every batch; DoRA
      r=8 (alpha 64, dropout 0.1, Gaussian init) on the decoder's q/k/v/o and down projections; lr
      5e-5 linear with 100 warm-up steps, 1,500 steps; 16 clusters per device on 8 devices; GradCache
      chunks of 4; 448 x 448 (``mid_low``) images; max length 1024; bf16; the plain InfoNCE loss at
      temperature 0.02 (no false-negative filters: see ``filtered_config``).
    - ``g2e-jax eval`` (``cli.evaluate``): ``configs/mmeb_eval.py`` / the ``zero_shot`` preset
      (max length 2048, ``random`` images).
    """
    from g2e_jax.mine import MMEB_TRAIN_SUBSETS

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


def filtered_config() -> ml_collections.ConfigDict:
    """The SaHa recipe with this project's in-step false-negative filters on (not the paper's run):
    candidates equal to the anchor's positive, and rows of the same query, are masked in the loss."""
    c = saha_reference_config()
    c.train.mask_same_target = True
    c.train.mask_same_query = True
    return c


def inbatch_reference_config() -> ml_collections.ConfigDict:
    """The paper's in-batch negative baseline: plain MMEB-train rows (``original`` split, each row its
    own cluster, at most 100,000 per subset as ``shuffle(seed=42).select(range(n))``), drawn at random
    across subsets, with the SaHa recipe's optimiser, schedule, steps and encode settings. As with the
    official command's ``--per_device_train_batch_size 16`` (no hard negatives), a batch is 16 rows
    per device: 128 pairs on 8 devices. Needs ``data.root`` (MMEB-train), not mined clusters."""
    c = saha_reference_config()
    c.data.source = "mmeb"
    return c
