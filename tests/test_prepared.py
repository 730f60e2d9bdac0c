"""Prepared (TFDS array_record) datasets: every record equals on-the-fly preprocessing, read without TF."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from g2e_jax.data.images import load_image, resize_for_resolution
from g2e_jax.models.qwen2_vl.images import ImageConfig, expand_patches, preprocess, preprocess_uint8, smart_resize
from g2e_jax.data.mmeb import read_train
from g2e_jax.data.prepared import META_FILE, SIDES, PreparedDataset, content_id
from g2e_jax.prepare import prepare_config, run_prepare
from g2e_jax.data.synthetic import make_synthetic
from g2e_jax.models import BACKBONES, make_tiny
from g2e_jax.preprocess import PreparedInputs, Preprocessor

# Image queries with repeated labels (SynShape: 6 rows, 5 shapes), text queries with image positives (SynT2I),
# and a Matching subset, whose positives use the query template.
SUBSETS = ("SynShape", "SynT2I", "SynGround-Matching")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn"), train_rows=6, eval_queries=2)


def _cfg(tiny_dir, synthetic, out, **changes):
    cfg = prepare_config()
    cfg.model.path = str(tiny_dir)
    cfg.data.root = str(synthetic / "train")
    cfg.data.image_dir = str(synthetic / "images")
    cfg.subsets = SUBSETS
    cfg.output_dir = str(out)
    cfg.shard_records = 7  # several shards, the last one short
    cfg.workers = 2
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


@pytest.fixture(scope="module")
def prepared(tiny_dir, synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "dataset"
    return run_prepare(_cfg(tiny_dir, synthetic, out))


def _assert_same(got, want, where):
    np.testing.assert_array_equal(got.user_ids, want.user_ids, err_msg=where)
    assert got.user_ids.dtype == want.user_ids.dtype, where
    assert got.next_pos == want.next_pos and got.truncated_from == want.truncated_from, where
    if want.user_pos is None:
        assert got.user_pos is None, where
    else:
        np.testing.assert_array_equal(got.user_pos, want.user_pos, err_msg=where)
    if want.grid_thw is None:
        assert got.grid_thw is None and got.patches is None, where
    else:
        np.testing.assert_array_equal(got.grid_thw, want.grid_thw, err_msg=where)
        # The reader gives int64 geometry (Qwen's grid_thw dtype; LLaVA-NeXT's layout is int32 and
        # collate casts either to int32).
        assert got.patches.dtype == np.float32 and got.grid_thw.dtype == np.int64, where
        assert want.grid_thw.dtype.kind == "i", where
        np.testing.assert_array_equal(got.patches, want.patches, err_msg=where)  # bit for bit


def _check_against_fly(ds: PreparedDataset, pp: Preprocessor, synthetic):
    image_dir = synthetic / "images"
    assert len(ds) == len(SUBSETS) * 6
    for subset in SUBSETS:
        rows = read_train(synthetic / "train", subset, image_dir=image_dir)
        want = {
            "qry": pp.prepare(
                [r.qry for r in rows], [r.qry_image for r in rows], role="query", subset=subset
            ),
            "pos": pp.prepare(
                [r.pos_text for r in rows], [r.pos_image for r in rows], role="document", subset=subset
            ),
        }
        for k in range(len(rows)):
            i = ds.index(subset, k)
            assert ds.locate(i) == (subset, k)
            rec = ds[i]
            assert rec["subset"] == subset and rec["row"] == k
            for side in SIDES:
                where = f"{subset} row {k} {side}"
                _assert_same(PreparedInputs(ds)(rec, side), want[side][k], where)
                assert rec[f"{side}_patches"].dtype == np.uint8
                assert rec[f"{side}_pos"].shape == (3, len(rec[f"{side}_ids"]))
                if want[side][k].grid_thw is None:
                    assert rec[f"{side}_patches"].shape == (0, ds.meta["patch_dim_uint8"])
                    assert not rec[f"{side}_grid"].any()
        assert ds.role(subset, "qry") == "query"
        assert ds.role(subset, "pos") == ("query" if "Matching" in subset else "document")


def test_records_match_on_the_fly(prepared, tiny_dir, synthetic):
    ds = PreparedDataset(prepared)
    pp = Preprocessor.from_pretrained(tiny_dir)
    _check_against_fly(ds, pp, synthetic)
    # gen2embed stores zero positions; prepared_row gives None like the Preprocessor.
    assert not ds[0]["qry_pos"].any() and ds.prepared_row(0, "qry").user_pos is None
    meta = ds.meta
    assert (
        meta["scheme"] == "gen2embed" and meta["max_len"] == 1024 and meta["model"]["path"] == str(tiny_dir)
    )
    assert [s["offset"] for s in meta["subsets"]] == [0, 6, 12]
    assert meta["shard_lengths"] == [7, 7, 4] and ds.builder.info.splits["train"].shard_lengths == [7, 7, 4]
    assert sorted(p.name for p in prepared.iterdir() if "array_record" in p.name) == [
        f"g2e_jax_prepared-train.array_record-0000{k}" for k in range(3)
    ]
    batch = ds.__getitems__([5, 0, 17])
    assert [b["row"] for b in batch] == [5, 0, 5] and batch[2]["subset"] == SUBSETS[2]


@pytest.fixture(scope="module", params=tuple(BACKBONES))
def backbone_prepared(request, synthetic, tmp_path_factory):
    """(model_type, tiny model, its prepared dataset) for every backbone in the table."""
    arch = request.param
    base = tmp_path_factory.mktemp(f"prep_{arch}")
    model = make_tiny(base / "model", arch=arch)
    return arch, model, run_prepare(_cfg(model, synthetic, base / "dataset"))


def test_every_backbone_records_match_on_the_fly(backbone_prepared, synthetic):
    """Each backbone's prepared records are what its own Preprocessor makes, bit for bit (Qwen3-VL: 16-pixel
    patches, mean/std 0.5; LLaVA-NeXT: anyres tiles and layout), and the metadata names the backbone."""
    arch, model, out = backbone_prepared
    ds, pp = PreparedDataset(out), Preprocessor.from_pretrained(model)
    _check_against_fly(ds, pp, synthetic)
    images = BACKBONES[arch].images
    assert ds.model_type == ds.meta["model_type"] == arch and ds.meta["format_version"] == 2
    assert PreparedInputs(ds).image_config == pp.image_config  # the settings survive the JSON round trip
    assert ds.meta["patch_dim_uint8"] == images.stored_dim(pp.image_config)
    if arch == "qwen3_vl":
        assert pp.image_config.patch_size == 16 and pp.image_config.image_mean == (0.5, 0.5, 0.5)
        assert ds.meta["patch_dim_uint8"] == 3 * 16 * 16
    if arch == "llava_next":
        assert ds.meta["patch_dim_uint8"] == 3 * pp.image_config.tile_size**2


def test_training_refuses_a_prepared_dataset_of_another_backbone(backbone_prepared, tmp_path):
    from g2e_jax.train.config import training_config
    from g2e_jax.train.data import TrainData

    arch, model, out = backbone_prepared
    other = tuple(BACKBONES)[(tuple(BACKBONES).index(arch) + 1) % len(BACKBONES)]
    other_pp = Preprocessor.from_pretrained(make_tiny(tmp_path / "other", arch=other))
    cfg = training_config(subsets=SUBSETS)
    cfg.data.source, cfg.data.prepared_dir = "prepared", str(out)
    cfg.image_resolution = None
    with pytest.raises(ValueError, match=rf"{re.escape(str(out))}: prepared for {arch}, but the model is {other}"):
        TrainData.from_config(cfg, other_pp)
    assert TrainData.from_config(cfg, Preprocessor.from_pretrained(model)).prepared is not None


def test_version_1_datasets_read_as_qwen2_vl_family(prepared, tiny_dir, tmp_path):
    """A dataset written before the metadata named its backbone holds Qwen2-VL-family patches: it still
    loads unchanged, for a Qwen2-VL-family model with its patch arithmetic only."""
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(prepared, old)
    meta = json.loads((old / META_FILE).read_text())
    del meta["model_type"]
    meta["format_version"] = 1
    (old / META_FILE).write_text(json.dumps(meta))
    ds, new = PreparedDataset(old), PreparedDataset(prepared)
    assert ds.model_type == "qwen2_vl"
    for i in range(len(ds)):
        for side in SIDES:
            _assert_same(PreparedInputs(ds)(i, side), PreparedInputs(new)(i, side), f"record {i} {side}")
    inputs, pp = PreparedInputs(ds), Preprocessor.from_pretrained(tiny_dir)
    inputs.check_model("qwen2_vl", pp.image_config)
    inputs.check_model("qwen2_5_vl", pp.image_config)  # same family, same arithmetic
    qwen3 = Preprocessor.from_pretrained(make_tiny(tmp_path / "q3", arch="qwen3_vl"))
    with pytest.raises(ValueError, match=rf"{re.escape(str(old))}: prepared with other image settings .*patch_size=14 \(model: 16\)"):
        inputs.check_model("qwen3_vl", qwen3.image_config)
    with pytest.raises(ValueError, match=rf"{re.escape(str(old))}: prepared for a Qwen2-VL-family model .* the model is llava_next"):
        inputs.check_model("llava_next")
    meta["model_type"] = "qwen2_vl"  # version 1 never named one: a mixed-up file is refused
    (old / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 1 must not name a model_type"):
        PreparedDataset(old)


def test_mrope_and_resolution(tiny_dir, synthetic, tmp_path):
    cfg = _cfg(tiny_dir, synthetic, tmp_path / "mrope", **{"prompt.scheme": "mrope"}, image_resolution="low")
    ds = PreparedDataset(run_prepare(cfg))
    pp = Preprocessor.from_pretrained(tiny_dir, scheme="mrope", image_resolution="low")
    _check_against_fly(ds, pp, synthetic)
    assert ds.meta["image_config"]["resolution"] == "low" and ds[0]["qry_pos"].any()


def test_embeddings_equal_on_the_fly(backbone_prepared, synthetic):
    """prepared_row plugs into Embedder.encode_prepared and gives Embedder.encode's embeddings exactly,
    for every backbone."""
    from g2e_jax.embed import Embedder

    _, model, out = backbone_prepared
    ds = PreparedDataset(out)
    embedder = Embedder.from_pretrained(model, progress=False)
    for subset in ("SynT2I", "SynGround-Matching"):
        rows = read_train(synthetic / "train", subset, image_dir=synthetic / "images")
        for side, role, texts, images in (
            ("qry", "query", [r.qry for r in rows], [r.qry_image for r in rows]),
            ("pos", "document", [r.pos_text for r in rows], [r.pos_image for r in rows]),
        ):
            want = embedder.encode(texts, images, role=role, subset=subset, progress=False)
            got = embedder.encode_prepared(
                [PreparedInputs(ds)(ds.index(subset, k), side) for k in range(len(rows))],
                role=ds.role(subset, side),
                progress=False,
            )
            np.testing.assert_array_equal(got, want, err_msg=f"{subset} {side}")


def test_content_ids(prepared, synthetic):
    ds = PreparedDataset(prepared)
    image_dir = synthetic / "images"
    seen: dict[int, tuple] = {}
    by_content: dict[tuple, int] = {}
    for subset in SUBSETS:
        rows = read_train(synthetic / "train", subset, image_dir=image_dir)
        for k, r in enumerate(rows):
            rec = ds[ds.index(subset, k)]
            for side, text, image in (("qry", r.qry, r.qry_image), ("pos", r.pos_text, r.pos_image)):
                key = (text, None if image is None else str(image).removeprefix(str(image_dir) + "/"))
                cid = int(rec[f"{side}_content_id"])
                assert 0 <= cid < 2**63 and cid == content_id(*key)
                assert by_content.setdefault(key, cid) == cid  # equal content -> equal id
                assert seen.setdefault(cid, key) == key  # different content -> different id
    # SynShape's 6 positives name 5 shapes: some repeat, so the equal-content branch was exercised.
    shape_pos = [int(ds[ds.index("SynShape", k)]["pos_content_id"]) for k in range(6)]
    assert len(set(shape_pos)) < 6


def test_process_indices(prepared):
    ds = PreparedDataset(prepared)
    n = len(ds)
    for count in (1, 2, 3, 4, 5, n + 2):
        shares = [ds.process_indices(p, count) for p in range(count)]
        np.testing.assert_array_equal(np.concatenate(shares), np.arange(n))
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1
        assert all(np.all(np.diff(s) == 1) for s in shares if len(s))
    with pytest.raises(ValueError):
        ds.process_indices(2, 2)


@pytest.mark.slow  # a fresh interpreter preparing and reading a dataset
def test_no_tensorflow(prepared, tiny_dir, synthetic, tmp_path):
    """Reading (and writing) go through TFDS' numpy paths: TensorFlow is never imported."""
    cfg = _cfg(tiny_dir, synthetic, tmp_path / "again", subsets=("SynT2I",))
    code = textwrap.dedent(f"""
        import sys
        from g2e_jax.data.prepared import PreparedDataset
        from g2e_jax.prepare import run_prepare
        ds = PreparedDataset({str(prepared)!r})
        for i in range(len(ds)):
            ds.prepared_row(i, "qry"), ds.prepared_row(i, "pos")
        print("tensorflow" in sys.modules)
        run_prepare(__import__("ml_collections").ConfigDict({cfg.to_dict()!r}))
        print("tensorflow" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["False", "False"], out.stdout + out.stderr[-3000:]


def test_rerun_replaces_and_refuses_foreign(tiny_dir, synthetic, tmp_path):
    out = tmp_path / "ds"
    cfg = _cfg(tiny_dir, synthetic, out, subsets=("SynT2I",), shard_records=100)
    run_prepare(cfg)
    run_prepare(_cfg(tiny_dir, synthetic, out, subsets=("SynShape",), shard_records=100))
    ds = PreparedDataset(out)
    assert ds.subsets == ["SynShape"] and len(ds) == 6
    assert json.loads((out / META_FILE).read_text())["num_shards"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary folder left behind
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        run_prepare(_cfg(tiny_dir, synthetic, foreign))


def test_bad_row_names_subset_and_row(tiny_dir, synthetic, tmp_path):
    root = tmp_path / "train"
    (root / "Bad").mkdir(parents=True)
    rows = [{"qry": "fine", "qry_image_path": "", "pos_text": "ok", "pos_image_path": ""}] * 2
    rows.append({"qry": "", "qry_image_path": "", "pos_text": "ok", "pos_image_path": ""})
    (root / "Bad" / "original.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tiny_dir, synthetic, tmp_path / "out", subsets=("Bad",))
    cfg.data.root = str(root)
    # The data check before preprocessing names the subset, file, line and field.
    with pytest.raises(ValueError, match=r"Bad\s+\S+original\.jsonl:3\s+qry: empty text"):
        run_prepare(cfg)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["train"]
    # An image that exists but does not decode: named with its subset, row, side and path.
    good = next((synthetic / "images" / "SynShape").glob("*.png")).read_bytes()
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "cut.png").write_bytes(good[: len(good) // 2])
    rows[2] = {"qry": "fine", "qry_image_path": "", "pos_text": "<|image_1|>", "pos_image_path": "cut.png"}
    (root / "Bad" / "original.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg.data.image_dir = str(tmp_path / "img")
    with pytest.raises(ValueError, match=r"Bad\s+\S+original\.jsonl:3\s+pos_image_path: image \('.*cut.png'\): cannot read"):
        run_prepare(cfg)
    assert not (tmp_path / "out").exists()


def _float_reference(img, cfg: ImageConfig):
    """The original one-pass float pipeline (normalize the image, then patchify with T copies), written
    independently of expand_patches so that the round trip is not checked against itself."""
    img = resize_for_resolution(load_image(img, source="test"), cfg.resolution)
    h, w = smart_resize(img.height, img.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    img = img.resize((w, h), resample=cfg.resample)
    pixels = (np.asarray(img, dtype=np.uint8).astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    pixels = (pixels - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    x = pixels.transpose(2, 0, 1).reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.repeat(x[:, :, :, :, :, None], t, axis=5)
    return x.reshape(gh * gw, 3 * t * p * p), np.array([1, gh, gw])


@pytest.mark.parametrize("size", [(57, 91), (200, 33), (1, 1), (29, 301), (333, 444)])
@pytest.mark.parametrize(
    "cfg",
    [
        ImageConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64),
        ImageConfig(),
        ImageConfig(resolution="random"),
    ],
    ids=["small", "qwen2vl", "random"],
)
def test_uint8_round_trip(size, cfg):
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    u8, grid = preprocess_uint8(img, cfg)
    ref, ref_grid = _float_reference(img, cfg)
    assert u8.dtype == np.uint8 and u8.shape == (int(np.prod(grid)), 3 * 14 * 14)
    assert grid.dtype == np.int64
    np.testing.assert_array_equal(grid, ref_grid)
    expanded = expand_patches(u8, cfg)
    assert expanded.dtype == np.float32
    np.testing.assert_array_equal(expanded, ref)  # bit for bit
    want, want_grid = preprocess(img, cfg)
    np.testing.assert_array_equal(expanded, want)
    np.testing.assert_array_equal(grid, want_grid)
    with pytest.raises(ValueError, match="uint8 patches"):
        expand_patches(u8.astype(np.int16), cfg)


def test_plain_rows_capped_per_subset_as_the_official_sample(prepared, synthetic):
    """data.num_sample_per_subset picks the same rows from MMEB files and from a prepared dataset: those
    of the official ``load_dataset(...).shuffle(seed=42).select(range(n))``."""
    import datasets

    from g2e_jax.train.data import TrainData
    from g2e_jax.train.config import training_config

    cfg = training_config(subsets=SUBSETS)
    cfg.data.root, cfg.data.image_dir = str(synthetic / "train"), str(synthetic / "images")
    cfg.data.prepared_dir, cfg.data.num_sample_per_subset = str(prepared), 4
    cfg.data.source = "mmeb"
    from_files = TrainData.from_config(cfg, None)
    cfg.data.source = "prepared"
    from_prepared = TrainData.from_config(cfg, None)
    data = PreparedDataset(prepared)
    for subset in SUBSETS:
        file = synthetic / "train" / subset / "original.jsonl"
        official = datasets.load_dataset("json", data_files=str(file), split="train").shuffle(seed=42)
        expected = official.select(range(4))["qry"]
        assert [c[0]["qry"] for c in from_files.clusters[subset]] == expected
        rows = read_train(synthetic / "train", subset, image_dir=synthetic / "images")
        assert [rows[data[c[0]]["row"]].qry for c in from_prepared.clusters[subset]] == expected


def test_training_refuses_a_prepared_dataset_of_other_settings(prepared, synthetic):
    from g2e_jax.train.data import TrainData
    from g2e_jax.train.config import training_config

    cfg = training_config(subsets=SUBSETS)
    cfg.data.source, cfg.data.prepared_dir = "prepared", str(prepared)
    cfg.image_resolution = "mid_low"  # the paper recipe's; the fixture was prepared at native size
    with pytest.raises(ValueError, match=r"image_resolution=None \(config: 'mid_low'\)"):
        TrainData.from_config(cfg, None)
