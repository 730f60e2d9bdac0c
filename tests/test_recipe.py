"""The paper's recipe as the official commands run it (Gen2Embed README: cli.evaluate, cli.sample_mmeb,
cli.train), stage by stage; the batch composition; the official per-subset row sample."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from g2e_jax.config_utils import load_config
from g2e_jax.data.clusters import ClusterBatchSampler, batch_label
from g2e_jax.data.mmeb import read_train, sample_rows

# The official commands' values, stage by stage: (config field, value, the official flag or code it
# comes from).
# A change to a paper config that drifts from these fails here.
OFFICIAL = {
    "eval": [  # python -m cli.evaluate
        ("max_len", 2048, "--max_len 2048"),
        ("image_resolution", "random", "--image_resolution random"),
        ("prompt.preset", "hierarchical", "--Q_prompt/--D_prompt: the hierarchical system prompt"),
        ("prompt.scheme", "gen2embed", "transformers 4.46 rope index (bare image-pad runs, 1-D positions)"),
    ],
    "mine": [  # python -m cli.sample_mmeb
        ("mine.split", "diverse_instruction", "--dataset_split diverse_instruction"),
        ("mine.max_len", 2048, "--max_len 2048"),
        ("mine.image_resolution", "random", "--image_resolution random"),
        ("mine.batch_size", 16, "--per_device_eval_batch_size 16"),
        ("mine.top_k", 15, "--top_k 15"),
        ("mine.pool_mult", 3, "--pool_mult 3"),
        ("model.dtype", "bfloat16", "model.to(dtype=torch.bfloat16)"),
        ("prompt.preset", "hierarchical", "--Q_prompt/--D_prompt"),
    ],
    "train": [  # torchrun ... -m cli.train
        ("data.source", "clusters", "--dataset_name outputs/qwen2vl-mmeb_negs --hard_negatives 15"),
        ("data.num_sample_per_subset", 100_000, "--num_sample_per_subset 100000"),
        ("data.split", "original", "--split_name original"),
        ("max_len", 1024, "--max_len 1024"),
        ("image_resolution", "mid_low", "--image_resolution mid_low"),
        ("model.dtype", "bfloat16", "--bf16"),
        ("train.steps", 1500, "--max_steps 1500"),
        ("train.learning_rate", 5e-5, "--learning_rate 5e-5 --lr_scheduler_type linear"),
        ("train.warmup_steps", 100, "--warmup_steps 100"),
        ("train.temperature", 0.02, "--temperature 0.02"),
        ("train.clusters_per_batch", 128, "--per_device_train_batch_size 16 on --nproc_per_node=8"),
        ("train.batch_subsets", "mixed", "use_batch_sampling=False: the Trainer's random sampler"),
        ("train.grad_cache", True, "--grad_cache True"),
        ("train.rows_per_cell", 4, "--gc_q_chunk_size 4 --gc_p_chunk_size 4"),
        ("train.mask_same_target", False, "src/loss.py: plain InfoNCE, no filters"),
        ("train.mask_same_query", False, "src/loss.py: plain InfoNCE, no filters"),
        ("adapter.kind", "dora", "--lora (DoRA adapters)"),
        ("adapter.rank", 8, "--lora_r 8"),
        ("adapter.alpha", 64.0, "lora_alpha default 64"),
        ("adapter.dropout", 0.1, "lora_dropout default 0.1"),
        ("mine.top_k", 15, "--hard_negatives 15 (clusters of up to 16 rows)"),
    ],
    "inbatch": [  # the same cli.train command without hard negatives, on TIGER-Lab/MMEB-train
        ("data.source", "mmeb", "--dataset_name TIGER-Lab/MMEB-train (no --hard_negatives)"),
        ("data.split", "original", "--split_name original"),
        ("data.num_sample_per_subset", 100_000, "--num_sample_per_subset 100000"),
        ("train.batch_subsets", "mixed", "use_batch_sampling=False"),
        ("train.clusters_per_batch", 128, "--per_device_train_batch_size 16 on 8 devices"),
        ("train.steps", 1500, "--max_steps 1500"),
        ("train.learning_rate", 5e-5, "--learning_rate 5e-5"),
        ("train.warmup_steps", 100, "--warmup_steps 100"),
        ("max_len", 1024, "--max_len 1024"),
        ("image_resolution", "mid_low", "--image_resolution mid_low"),
        ("train.mask_same_target", False, "plain InfoNCE"),
        ("train.mask_same_query", False, "plain InfoNCE"),
        ("adapter.kind", "dora", "--lora"),
        ("adapter.rank", 8, "--lora_r 8"),
    ],
}

BACKBONES = (
    "configs/qwen2vl_2b_saha.py",
    "configs/qwen2vl_7b_saha.py",
    "configs/qwen2_5vl_3b.py",
    "configs/qwen2_5vl_7b.py",
)
# stage -> the config files (as a user names them) that run it
STAGE_CONFIGS = {
    "eval": ("configs/mmeb_eval.py", *(f"{b}:zero_shot" for b in BACKBONES)),
    "mine": BACKBONES,
    "train": BACKBONES,
    "inbatch": ("configs/qwen2vl_2b_inbatch.py", *(f"{b}:inbatch" for b in BACKBONES)),
}


def _get(cfg, dotted):
    for key in dotted.split("."):
        cfg = cfg[key]
    return cfg


@pytest.mark.parametrize("stage,config", [(s, c) for s, cs in STAGE_CONFIGS.items() for c in cs])
def test_configs_hold_the_official_values(stage, config):
    cfg = load_config(config)
    wrong = {
        f"{field} ({flag})": (_get(cfg, field), value)
        for field, value, flag in OFFICIAL[stage]
        if _get(cfg, field) != value or type(_get(cfg, field)) is not type(value)
    }
    assert not wrong, f"{config} drifts from the official {stage} command: {wrong}"


def test_filtered_variant_is_the_recipe_with_the_filters_on():
    saha = load_config("configs/qwen2vl_2b_saha.py")
    filtered = load_config("configs/qwen2vl_2b_saha.py:filtered")
    assert filtered.train.mask_same_target and filtered.train.mask_same_query
    a, b = saha.to_dict(), filtered.to_dict()
    a["train"].pop("mask_same_target"), a["train"].pop("mask_same_query")
    b["train"].pop("mask_same_target"), b["train"].pop("mask_same_query")
    assert a == b


def test_mine_encodes_and_reads_with_the_mine_settings(monkeypatch, tmp_path):
    """`run_mine` builds its Embedder from mine.* and reads mine.split, not the training values."""
    import g2e_jax.embed
    import g2e_jax.mine

    seen = {}

    class Stop(Exception):
        pass

    def fake_embedder(cfg):
        seen["encode"] = (cfg.max_len, cfg.image_resolution, cfg.batch_size, cfg.model.dtype)
        return object()

    def fake_read(root, subset, split, **kw):
        seen["split"] = split
        raise Stop

    monkeypatch.setattr(g2e_jax.embed.Embedder, "from_config", staticmethod(fake_embedder))
    monkeypatch.setattr(g2e_jax.mine, "read_train", fake_read)
    overrides = ["model.path=/m", f"data.root={tmp_path}", f"mine.output_dir={tmp_path}", "data.check=False"]
    cfg = load_config("configs/qwen2vl_2b_saha.py", overrides)
    with pytest.raises(Stop):
        g2e_jax.mine.run_mine(cfg)
    assert seen == {"encode": (2048, "random", 16, "bfloat16"), "split": "diverse_instruction"}


# --- batch composition ---------------------------------------------------------------------------------

SIZES = {"A": [4, 4, 3, 4, 2], "B": [4] * 7, "C": [1], "D": [2, 3, 1, 4]}


def _epoch(sampler, epoch=0):
    return [sampler.batch(epoch * sampler.steps_per_epoch + k) for k in range(sampler.steps_per_epoch)]


def test_mixed_batches_draw_clusters_across_subsets():
    sampler = ClusterBatchSampler(SIZES, clusters_per_batch=3, seed=7, batch_subsets="mixed")
    total = sum(len(v) for v in SIZES.values())
    assert sampler.steps_per_epoch == -(-total // 3)
    epoch = _epoch(sampler)
    # Every cluster exactly once per epoch, batches of 3 but the last.
    every = sorted((s, i) for s, v in SIZES.items() for i in range(len(v)))
    assert sorted(c for b in epoch for c in b) == every
    assert [len(b) for b in epoch] == [3] * (total // 3) + ([total % 3] if total % 3 else [])
    mixed = [b for b in epoch if len({s for s, _ in b}) > 1]
    assert len(mixed) >= len(epoch) // 2, epoch  # a uniform draw: most batches mix subsets
    assert batch_label(mixed[0]).startswith("mixed:") and batch_label([("A", 0), ("A", 3)]) == "A"
    # A pure function of (seed, step): a fresh sampler at any step, in any order, gives the same batch.
    for step in (37, 0, 5, 16):
        assert ClusterBatchSampler(SIZES, 3, seed=7, batch_subsets="mixed").batch(step) == sampler.batch(step)
    assert _epoch(sampler, 1) != epoch
    assert ClusterBatchSampler(SIZES, 3, seed=8, batch_subsets="mixed").batch(0) != sampler.batch(0)
    # The fixed batch shape: the 3 largest clusters of any subset.
    assert sampler.max_pairs() == 12
    assert ClusterBatchSampler({"A": [1, 5], "B": [6, 2]}, 2, batch_subsets="mixed").max_pairs() == 11
    assert ClusterBatchSampler({"A": [1, 5], "B": [6, 2]}, 2, batch_subsets="same").max_pairs() == 8


def _same_subset_reference(sizes, per_batch, seed, epoch):
    """The one-subset order as it was before batch_subsets existed (resumed runs must keep it)."""
    subsets, batches = sorted(s for s in sizes if sizes[s]), []
    for k, s in enumerate(subsets):
        order = np.random.default_rng([seed, epoch, k]).permutation(len(sizes[s]))
        batches += [(s, order[i : i + per_batch]) for i in range(0, len(order), per_batch)]
    shuffle = np.random.default_rng([seed, epoch, len(subsets)]).permutation(len(batches))
    return [[(batches[j][0], int(i)) for i in batches[j][1]] for j in shuffle]


def test_same_subset_batches_keep_their_order():
    sampler = ClusterBatchSampler(SIZES, clusters_per_batch=3, seed=7, batch_subsets="same")
    assert sampler.steps_per_epoch == 2 + 3 + 1 + 2
    for epoch in (0, 1):
        batches = _epoch(sampler, epoch)
        assert batches == _same_subset_reference(SIZES, 3, 7, epoch)
        assert all(len({s for s, _ in b}) == 1 for b in batches)
    with pytest.raises(ValueError, match="unknown batch_subsets 'x'"):
        ClusterBatchSampler(SIZES, 3, batch_subsets="x")


# --- the official per-subset sample --------------------------------------------------------------------


@pytest.mark.parametrize("num_rows,limit", [(50, 7), (8, 8), (8, 100), (1000, 999)])
def test_sample_rows_is_datasets_shuffle_seed_42(num_rows, limit):
    ds = datasets.Dataset.from_dict({"i": list(range(num_rows))})
    official = ds if num_rows <= limit else ds.shuffle(seed=42).select(range(limit))  # src/dataset.py
    assert sample_rows(num_rows, limit).tolist() == official["i"]
    assert sample_rows(num_rows, None).tolist() == list(range(num_rows))
    with pytest.raises(ValueError, match="num_sample_per_subset"):
        sample_rows(num_rows, 0)


def test_read_train_caps_a_subset_as_the_official_loader(tmp_path):
    folder = tmp_path / "Sub"
    folder.mkdir()
    rows = [
        {"qry": f"q{i}", "qry_image_path": "", "pos_text": f"p{i}", "pos_image_path": ""} for i in range(30)
    ]
    (folder / "original.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = datasets.load_dataset("json", data_files=str(folder / "original.jsonl"), split="train")
    official = ds.shuffle(seed=42).select(range(9))
    assert [r.qry for r in read_train(tmp_path, "Sub", num_samples=9)] == official["qry"]
    assert [r.qry for r in read_train(tmp_path, "Sub", num_samples=30)] == [r["qry"] for r in rows]
