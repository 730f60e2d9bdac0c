"""Every config file in configs/ loads, with each named variant it supports (``file.py:name``)."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import pytest

from g2e_jax.config_utils import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# file -> the variants its get_config(arg) accepts (None: the file itself, no argument).
VARIANTS = {
    "compare.py": [None],
    "demo.py": [None],
    "embed.py": [None],
    "llava_next_mistral_7b.py": [None, "saha", "filtered", "inbatch", "zero_shot", "plain"],
    "mmeb_eval.py": [
        None, "hierarchical", "plain", "system_only", "suffix_only", "default_system", "no_one_word"
    ],
    "prompt_ablation.py": [None],
    "qwen2_5vl_3b.py": [None, "saha", "filtered", "inbatch", "zero_shot", "plain"],
    "qwen2_5vl_7b.py": [None, "saha", "filtered", "inbatch", "zero_shot", "plain"],
    "qwen2vl_2b_inbatch.py": [None],
    "recipes.py": [None, "saha", "filtered", "inbatch", "zero_shot", "plain"],
    "qwen2vl_2b_saha.py": [None, "saha", "filtered", "inbatch", "zero_shot", "plain"],
    "qwen2vl_7b_saha.py": [None, "saha", "filtered", "inbatch", "zero_shot", "plain"],
    "qwen3vl_2b_saha.py": [None, "saha", "filtered", "inbatch", "zero_shot", "plain"],
    "qwen3vl_embedding_eval.py": [None, "qwen3_vl_embedding", "hierarchical"],
    "sugarcrepe.py": [None],
    "tiny.py": [None],
}
CASES = [f"{name}:{v}" if v else name for name, variants in VARIANTS.items() for v in variants]


def test_every_config_file_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.py")) == sorted(VARIANTS)


@pytest.mark.parametrize("case", CASES)
def test_config_loads(case):
    cfg = load_config(str(CONFIGS / case))
    assert isinstance(cfg, ml_collections.ConfigDict) and cfg.is_locked and len(cfg)
    assert str(cfg)  # the resolved config prints (config.txt)
    if "model" in cfg:
        assert "path" in cfg.model  # every job names its model


@pytest.mark.parametrize("name", [n for n, v in VARIANTS.items() if len(v) > 1])
def test_unknown_variant_is_an_error(name):
    with pytest.raises(ValueError, match="nope"):
        load_config(f"{CONFIGS / name}:nope")
