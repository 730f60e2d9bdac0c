"""Export embeddings with ``g2e-jax embed --config configs/embed.py --input rows.jsonl --output DIR``.

Override any field on the command line, e.g. ``--config.model.path=/models/Qwen2-VL-2B-Instruct
--config.model.dtype=bfloat16 --config.prompt.preset=plain``.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.path = config_dict.placeholder(str)  # local Hugging Face directory (required)
    c.model.dtype = "float32"  # or "bfloat16"

    c.prompt = ml_collections.ConfigDict()
    c.prompt.preset = "hierarchical"  # or "plain"
    c.prompt.scheme = "gen2embed"  # or "mrope"
    c.prompt.query_system = config_dict.placeholder(str)  # None: the preset's
    c.prompt.document_system = config_dict.placeholder(str)

    c.instruction = config_dict.placeholder(str)  # task instruction joined before each row's text
    c.subset = config_dict.placeholder(str)  # e.g. "RefCOCO-Matching": applies the Matching rule
    c.max_len = 1024
    c.image_resolution = config_dict.placeholder(str)  # low | clip | mid_low | mid | mid_high | high | random
    c.batch_size = 8
    c.shard_size = 512  # rows per checkpointed shard (unit of --resume)
    return c
