"""``g2e-jax check-data`` and the bad-row policy of training data, on the synthetic set with bad rows
of several kinds (a truncated image, an empty image file, a missing image, invalid JSON, a wrong type,
a side with nothing to embed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from g2e_jax.check_data import cache_file, check_data, format_report
from g2e_jax.data.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
SUBSETS = ("SynShape", "SynT2I", "SynGround")


def corrupt(data: Path) -> dict:
    """Breaks rows of the synthetic set in place; returns {(subset, line): field} of what was broken."""
    image = data / "images/SynT2I/train_00010.png"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # truncated: row 11 of SynT2I
    (data / "images/SynShape/train_00003.png").write_bytes(b"")  # empty: row 4 of SynShape
    t2i = data / "train/SynT2I/original.jsonl"
    lines = t2i.read_text().splitlines()
    lines[4] = lines[4][:-5]  # line 5: invalid JSON
    row = json.loads(lines[6])
    row["pos_image_path"] = "SynT2I/nowhere.png"  # line 7: missing image
    lines[6] = json.dumps(row)
    row = json.loads(lines[7])
    row["qry"] = 42  # line 8: wrong type
    lines[7] = json.dumps(row)
    t2i.write_text("\n".join(lines) + "\n")
    shape = data / "train/SynShape/original.jsonl"
    lines = shape.read_text().splitlines()
    row = json.loads(lines[1])
    row["pos_text"] = ""  # line 2: a text-only side with no text
    lines[1] = json.dumps(row)
    shape.write_text("\n".join(lines) + "\n")
    return {
        ("SynShape", 2): "pos_text",
        ("SynShape", 4): "qry_image_path",
        ("SynT2I", 5): "<line>",
        ("SynT2I", 7): "pos_image_path",
        ("SynT2I", 8): "qry",
        ("SynT2I", 11): "pos_image_path",
    }


@pytest.fixture()
def bad_set(tmp_path):
    data = make_synthetic(tmp_path / "data", train_rows=12, eval_queries=2)
    return data, corrupt(data)


def _cfg(data: Path, tmp_path: Path, **data_fields) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.data = ml_collections.ConfigDict(
        dict(
            source="mmeb",
            root=str(data / "train"),
            image_dir=str(data / "images"),
            split="original",
            subsets=SUBSETS,
            check_cache=str(tmp_path / "cache" / "check.json"),
            check_workers=2,
        )
    )
    cfg.data.update(data_fields)
    return cfg


def test_every_bad_row_is_reported_once_with_subset_file_line_and_field(bad_set, tmp_path):
    data, broken = bad_set
    cfg = _cfg(data, tmp_path)
    result = check_data(cfg, progress=False)
    got = {(b["subset"], b["line"]): b["field"] for b in result["bad"]}
    assert got == broken
    by_line = {(b["subset"], b["line"]): b for b in result["bad"]}
    assert by_line[("SynT2I", 11)]["file"] == str(data / "train/SynT2I/original.jsonl")
    assert "truncated" in by_line[("SynT2I", 11)]["reason"]
    assert "zero-size" in by_line[("SynShape", 4)]["reason"]
    assert "not found" in by_line[("SynT2I", 7)]["reason"]
    assert result["subsets"]["SynGround"] == {"rows": 12, "images": 30, "bad": 0, "cached": False}
    text = format_report(result)
    assert "6 bad rows" in text and f"{data / 'train/SynT2I/original.jsonl'}:11  pos_image_path" in text
    print("\n" + text)

    # Cached: a second pass opens nothing (images made unreadable would otherwise be found)...
    cache = json.loads(Path(result["cache"]).read_text())
    assert all(Path(f[0]).is_absolute() for s in cache["subsets"].values() for f in s["files"] + s["dirs"])
    again = check_data(cfg, progress=False)
    assert again["bad"] == result["bad"] and all(s["cached"] for s in again["subsets"].values())
    # ... until a subset file changes: only that subset is checked again.
    shape = data / "train/SynShape/original.jsonl"
    lines = shape.read_text().splitlines()
    lines[1] = lines[0]
    shape.write_text("\n".join(lines) + "\n")
    third = check_data(cfg, progress=False)
    assert [s["cached"] for s in third["subsets"].values()] == [False, True, True]
    assert ("SynShape", 2) not in {(b["subset"], b["line"]) for b in third["bad"]}
    # ... or a file appears in (or leaves) an image folder.
    (data / "images/SynGround/extra.png").write_bytes(b"")
    assert not check_data(cfg, progress=False)["subsets"]["SynGround"]["cached"]


def test_default_cache_location_depends_on_the_source(bad_set, tmp_path):
    data, _ = bad_set
    a, b = (
        _cfg(data, tmp_path, check_cache=None),
        _cfg(data, tmp_path, check_cache=None, split="diverse_instruction"),
    )
    assert cache_file(a) != cache_file(b) and cache_file(a).is_absolute()


def test_clusters_name_the_member(bad_set, tmp_path):
    """In a cluster file a bad negative is named by the cluster's line and its place in neg_samples."""
    data, _ = bad_set
    mined = tmp_path / "mined" / "SynGround"
    mined.mkdir(parents=True)
    rows = [json.loads(x) for x in (data / "train/SynGround/original.jsonl").read_text().splitlines()]
    bad = dict(rows[2], qry_image_path="SynGround/gone.png")
    clusters = [dict(rows[0], neg_samples=[rows[1]]), dict(rows[3], neg_samples=[rows[4], bad])]
    (mined / "original.jsonl").write_text("".join(json.dumps(c) + "\n" for c in clusters))
    cfg = _cfg(
        data, tmp_path, source="clusters", clusters_dir=str(tmp_path / "mined"), subsets=("SynGround",)
    )
    (found,) = check_data(cfg, progress=False)["bad"]
    assert (found["line"], found["member"], found["field"]) == (2, 2, "qry_image_path")


@pytest.mark.slow  # the command in a subprocess: the quick tier leaves it out
def test_check_data_command(bad_set, tmp_path):
    data, _ = bad_set
    cmd = [
        sys.executable,
        "-m",
        "g2e_jax.cli",
        "check-data",
        "--config",
        str(ROOT / "configs/tiny.py"),
        "--config.data.source=mmeb",
        f"--config.data.root={data / 'train'}",
        f"--config.data.image_dir={data / 'images'}",
        f"--config.data.subsets={SUBSETS!r}",
    ]
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert (
        "6 bad rows" in proc.stdout and "SynT2I/original.jsonl:8  qry: expected text, got int" in proc.stdout
    )
    assert str(tmp_path / "xdg") in proc.stdout  # the cache
    shutil.rmtree(data / "train/SynT2I")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 2 and "no subset 'SynT2I'" in proc.stderr


def test_train_data_bad_rows_policy(bad_set, tiny_dir, tmp_path):
    """During a run: "error" names subset, file, line and field; "skip" leaves padding in the row's place
    and a record of it, and keeps every other row where it was."""
    from g2e_jax.preprocess import Preprocessor
    from g2e_jax.train.data import BadRowError, TrainData

    data, _ = bad_set
    pre = Preprocessor.from_pretrained(tiny_dir, max_len=256)
    cfg = _cfg(data, tmp_path, subsets=("SynShape",), bad_rows="error")
    strict = TrainData.from_config(cfg, pre)
    with pytest.raises(BadRowError) as error:
        strict.pairs([("SynShape", i) for i in range(5)])
    message = str(error.value)
    assert f"{data / 'train/SynShape/original.jsonl'} line 2, field 'pos_text'" in message
    assert "row 0" not in message
    lenient = TrainData.from_config(_cfg(data, tmp_path, subsets=("SynShape",), bad_rows="skip"), pre)
    pairs = lenient.pairs([("SynShape", i) for i in range(5)])
    assert [p is None for p in pairs] == [False, True, False, True, False]
    assert [(r["line"], r["field"]) for r in lenient.skipped] == [(2, "pos_text"), (4, "qry_image_path")]
    assert all(
        r["subset"] == "SynShape" and r["file"].endswith("SynShape/original.jsonl") for r in lenient.skipped
    )
    # Fitting the run's one batch shape to the data meets the same rows: "error" raises there, before
    # any step; "skip" leaves them out without a second record (the run records them where it meets them).
    with pytest.raises(BadRowError, match="line 2, field 'pos_text'"):
        TrainData.from_config(cfg, pre).side_maxima(4, progress=False)
    fresh = TrainData.from_config(_cfg(data, tmp_path, subsets=("SynShape",), bad_rows="skip"), pre)
    assert fresh.side_maxima(4, progress=False)[0, 0] > 0 and fresh.skipped == []
