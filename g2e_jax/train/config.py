"""The training config's schema: every section a training config has, with its defaults (the
recipes that change them live in ``configs/recipes.py``)."""

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
    # Layers per iteration of the decoder's and the vision towers' layer scans (1: one layer's program,
    # compile time flat in depth; more: larger programs that some backends run faster). Same weights.
    t.scan_unroll = 1
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
