"""Zero-shot MMEB evaluation: ``g2e-jax eval --config configs/mmeb_eval.py --config.model.path=DIR
--config.data.root=MMEB-eval --config.data.image_dir=eval_images --config.output_dir=OUT``.

``configs/mmeb_eval.py:plain`` selects the paper's plain-prompt baseline.
"""

import ml_collections
from ml_collections import config_dict

from g2e_jax.eval.mmeb import MMEB_GROUPS


def get_config(preset: str = "hierarchical"):
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.path = config_dict.placeholder(str)  # local Hugging Face directory (required)
    c.model.dtype = "float32"  # or "bfloat16"

    c.prompt = ml_collections.ConfigDict()
    c.prompt.preset = preset  # "hierarchical" or "plain"
    c.prompt.scheme = "gen2embed"  # or "mrope"
    c.prompt.query_system = config_dict.placeholder(str)
    c.prompt.document_system = config_dict.placeholder(str)

    c.data = ml_collections.ConfigDict()
    c.data.root = config_dict.placeholder(str)  # folder with one sub-folder per subset (test split)
    c.data.image_dir = config_dict.placeholder(str)  # image paths in the rows are relative to it
    c.data.groups_file = config_dict.placeholder(str)  # JSON {subset: {category, split}}; None: MMEB's table
    c.subsets = tuple(MMEB_GROUPS)  # all 36 MMEB subsets

    c.output_dir = config_dict.placeholder(str)  # results.json / results.md / results.png
    c.cache_dir = config_dict.placeholder(str)  # candidate-embedding cache; None: <output_dir>/cache
    c.max_len = 1024
    c.image_resolution = config_dict.placeholder(str)
    c.batch_size = 8
    return c
