"""SaHa on Qwen2-VL-2B, the paper's reference run (DESIGN.md §1).

Mining: ``g2e-jax mine --config configs/qwen2vl_2b_saha.py --config.model.path=/models/Qwen2-VL-2B-Instruct
--config.data.root=/data/MMEB-train --config.data.image_dir=/data/MMEB-train/images
--config.mine.output_dir=runs/saha_2b``. Training settings arrive with the trainer.
"""

import ml_collections
from ml_collections import config_dict

from g2e_jax.mine import MMEB_TRAIN_SUBSETS, mine_section


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.path = config_dict.placeholder(str)  # local Qwen2-VL-2B-Instruct directory
    c.model.dtype = "bfloat16"

    c.prompt = ml_collections.ConfigDict()
    c.prompt.preset = "hierarchical"
    c.prompt.scheme = "gen2embed"
    c.prompt.query_system = config_dict.placeholder(str)
    c.prompt.document_system = config_dict.placeholder(str)

    c.data = ml_collections.ConfigDict()
    c.data.root = config_dict.placeholder(str)  # MMEB-train: one folder per subset
    c.data.image_dir = config_dict.placeholder(str)
    c.data.split = "original"
    c.data.subsets = MMEB_TRAIN_SUBSETS

    c.max_len = 1024
    c.image_resolution = config_dict.FieldReference("mid_low", field_type=str)  # 448 x 448 (None: processor's own)
    c.batch_size = 16

    c.mine = mine_section()
    return c
