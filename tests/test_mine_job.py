"""``g2e-jax mine`` on the synthetic set, resuming from the embedding cache; the cluster sampler."""

from __future__ import annotations

import json
import shutil

import pytest

from g2e_jax.config_utils import load_config
from g2e_jax.data.clusters import ClusterBatchSampler, read_clusters
from g2e_jax.data.mmeb import read_train
from g2e_jax.data.synthetic import make_synthetic
from g2e_jax.mine import run_mine

CONFIG = "configs/qwen2vl_2b_saha.py"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn") / "data", train_rows=24, eval_queries=2)


def _cfg(tiny_dir, synthetic, out):
    return load_config(CONFIG, [
        f"model.path={tiny_dir}", "model.dtype=float32", f"data.root={synthetic / 'train'}",
        f"data.image_dir={synthetic / 'images'}", "data.subsets=('SynShape', 'SynT2I')", f"mine.output_dir={out}",
        "mine.top_k=3", "mine.pool_mult=2", "mine.image_resolution=None", "mine.encode_chunk=8",
        "mine.classification_subsets=('SynShape', 'SynColor')",
    ])  # fmt: skip


@pytest.mark.slow  # three mining runs
def test_mine_writes_clusters_and_resumes_from_cache(tiny_dir, synthetic, tmp_path):
    out = tmp_path / "mined"
    first = run_mine(_cfg(tiny_dir, synthetic, out))
    for subset in ("SynShape", "SynT2I"):
        stats = json.loads((out / subset / "stats.json").read_text())
        assert stats["clusters"] == first[subset]["clusters"] > 0 and not stats["embeddings_from_cache"]
        assert set(stats["recall"]) == {"recall@1", "recall@5", "recall@10"}
        clusters = read_clusters(out / subset / "original.jsonl")
        assert len(clusters) == stats["clusters"]
        assert all(1 <= len(c) <= 4 for c in clusters)
        # MMEB-train compatible: the train reader reads the anchors back, images resolved.
        anchors = read_train(out, subset, image_dir=synthetic / "images")
        assert len(anchors) == len(clusters)
    assert first["SynShape"]["classification"] and not first["SynT2I"]["classification"]
    # Interrupted run: one embedding chunk lost -> only it is recomputed, the clusters are identical.
    chunks = sorted((out / "cache").glob("SynT2I-queries-*/*.npy"))
    assert len(chunks) >= 2
    chunks[-1].unlink()
    before = (out / "SynT2I" / "original.jsonl").read_text()
    again = run_mine(_cfg(tiny_dir, synthetic, out))
    assert again["SynShape"]["embeddings_from_cache"] and not again["SynT2I"]["embeddings_from_cache"]
    assert (out / "SynT2I" / "original.jsonl").read_text() == before
    third = run_mine(_cfg(tiny_dir, synthetic, out))
    assert third["SynT2I"]["embeddings_from_cache"]
    shutil.rmtree(out / "cache")


def test_sampler_is_deterministic_resumable_and_covers_each_epoch():
    sizes = {"A": [4, 4, 3, 4, 2], "B": [4] * 7, "C": [1]}
    for mode in ("same", "mixed"):
        sampler = ClusterBatchSampler(sizes, clusters_per_batch=3, seed=7, batch_subsets=mode)
        assert sampler.steps_per_epoch == (2 + 3 + 1 if mode == "same" else 5)
        epoch = [sampler.batch(k) for k in range(sampler.steps_per_epoch)]
        seen = {s: sorted(i for b in epoch for t, i in b if t == s) for s in sizes}
        assert seen == {s: list(range(len(v))) for s, v in sizes.items()}  # every cluster once per epoch
        assert all(len(b) <= 3 for b in epoch)
        # Jumping to a step equals iterating to it; another epoch gives another order.
        fresh = ClusterBatchSampler(sizes, clusters_per_batch=3, seed=7, batch_subsets=mode)
        for step, clusters in fresh(start_step=0):
            if step == 20:
                break
            assert ClusterBatchSampler(sizes, 3, seed=7, batch_subsets=mode).batch(step) == clusters
        second_epoch = [sampler.batch(k + sampler.steps_per_epoch) for k in range(sampler.steps_per_epoch)]
        assert second_epoch != epoch
        assert sampler.max_pairs() == 12
    with pytest.raises(ValueError, match="no clusters"):
        ClusterBatchSampler({"A": []}, 2)
