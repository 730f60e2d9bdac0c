"""Paths in files: absolute or relative to the holding file; command-line paths made absolute once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_collections
import pytest
from ml_collections import config_dict

from g2e_jax.paths import absolute_config_paths, relative_to_file, resolve_from, resolve_in


def test_config_path_fields_become_absolute_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"path": "models/tiny", "dtype": "float32"})
    c.data = ml_collections.ConfigDict({"root": "syn/train", "image_dir": "syn/images", "split": "original"})
    c.data.groups_file = "syn/groups.json"
    c.data.prepared_dir = config_dict.placeholder(str)
    c.output_dir = "/already/absolute"
    c.cache_dir = "gs://bucket/cache"  # URLs stay as they are
    c.subsets = ("syn/not_a_path",)
    c.distributed = ml_collections.ConfigDict({"coordinator": "host:1234"})
    c.lock()
    out = absolute_config_paths(c)
    assert out.model.path == str(tmp_path / "models" / "tiny")
    assert out.data.root == str(tmp_path / "syn" / "train")
    assert out.data.image_dir == str(tmp_path / "syn" / "images")
    assert out.data.groups_file == str(tmp_path / "syn" / "groups.json")
    assert out.data.prepared_dir is None and out.output_dir == "/already/absolute"
    assert out.cache_dir == "gs://bucket/cache"
    assert (
        out.model.dtype == "float32" and out.data.split == "original" and out.subsets == ("syn/not_a_path",)
    )
    assert out.distributed.coordinator == "host:1234"
    assert out.is_locked and c.model.path == "models/tiny"  # a copy: the caller's config is unchanged
    with pytest.raises(AttributeError):
        out.new_field = 1


def test_resolving_against_the_holding_file(tmp_path):
    holder = tmp_path / "run" / "config.json"
    assert resolve_from(holder, "../models/tiny") == str(tmp_path / "models" / "tiny")
    assert resolve_from(holder, "/abs/model") == "/abs/model"
    assert resolve_in(tmp_path / "images", "a/b.png") == str(tmp_path / "images" / "a" / "b.png")
    stored = relative_to_file(tmp_path / "data" / "images" / "x.png", tmp_path / "out" / "corpus.jsonl")
    assert stored == "../data/images/x.png"
    assert resolve_from(tmp_path / "out" / "corpus.jsonl", stored) == str(
        tmp_path / "data" / "images" / "x.png"
    )


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from g2e_jax.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("paths") / "syn", train_rows=4, eval_queries=1)


def _train_cfg(tiny_dir, **data):
    from g2e_jax.train.config import training_config

    cfg = training_config(subsets=("SynColor",))
    cfg.model.path = str(tiny_dir)
    cfg.data.update(data)
    return cfg.lock()


def test_training_rows_from_relative_paths_are_joined_once(tiny_dir, synthetic, tmp_path, monkeypatch):
    """The issue's `--config.data.root=syn/train --config.data.image_dir=syn/images` (relative): the
    images were looked for under syn/images/syn/images/."""
    from g2e_jax.preprocess import Preprocessor
    from g2e_jax.train.data import TrainData

    monkeypatch.chdir(synthetic.parent)
    pp = Preprocessor.from_pretrained(tiny_dir, max_len=256)
    data = TrainData.from_config(
        _train_cfg(tiny_dir, source="mmeb", root="syn/train", image_dir="syn/images"), pp
    )
    rows = [row for cluster in data.clusters["SynColor"] for row in cluster]
    assert len(data.pairs([("SynColor", i) for i in range(len(rows))])) == len(rows)  # reads every image
    assert all(os.path.isabs(r["qry_image_path"]) and Path(r["qry_image_path"]).is_file() for r in rows)


def test_cluster_files_resolve_relative_images_by_image_dir_or_by_the_file(tiny_dir, synthetic, tmp_path):
    from g2e_jax.data.clusters import read_clusters

    row = {"qry": "<|image_1|> q", "qry_image_path": "SynColor/train_00000.png", "pos_text": "red"}
    row.update(pos_image_path="", neg_samples=[], phase=1)
    mined = tmp_path / "mined" / "SynColor" / "original.jsonl"
    mined.parent.mkdir(parents=True)
    mined.write_text(json.dumps(row) + "\n")
    ((anchor,),) = read_clusters(mined, image_dir=synthetic / "images")  # MMEB convention (official files)
    assert anchor["qry_image_path"] == str(synthetic / "images" / "SynColor" / "train_00000.png")
    assert anchor["pos_image_path"] == ""
    ((anchor,),) = read_clusters(mined)  # no image_dir: relative to the cluster file
    assert anchor["qry_image_path"] == str(mined.parent / "SynColor" / "train_00000.png")
