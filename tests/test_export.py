"""``g2e-jax embed``: outputs, resume, and every kind of bad input (error or --skip-bad)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from g2e_jax import Embedder
from g2e_jax.config_utils import load_config
from g2e_jax.export import run_embed

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "embed.py")


def _write_rows(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(d / "good.png")
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(d / "full.png")
    data = (d / "full.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "text.png").write_text("not an image")
    (d / "empty.png").write_bytes(b"")
    Image.new("RGB", (402, 2)).save(d / "thin.png")  # aspect ratio 201
    return d


def _cfg(tiny_dir, **overrides):
    return load_config(CONFIG, [f"model.path={tiny_dir}", "batch_size=4", "shard_size=4"] + [
        f"{k}={v}" for k, v in overrides.items()])  # fmt: skip


def _good_rows(images, n=10):
    return [{"id": f"r{i}", "text": f"row {i} " + "word " * i, "image": "good.png" if i % 3 == 0 else None}
            for i in range(n)]  # fmt: skip


def test_export_writes_aligned_outputs(tiny_dir, images, tmp_path):
    rows = _good_rows(images)
    src = _write_rows(images / "rows.jsonl", rows)
    meta = run_embed(_cfg(tiny_dir), src, tmp_path / "out", role="query")
    emb = np.load(tmp_path / "out" / "embeddings.npy")
    ids = (tmp_path / "out" / "ids.txt").read_text().split()
    assert ids == [r["id"] for r in rows] and emb.shape == (10, meta["dim"]) and emb.dtype == np.float32
    expected = Embedder.from_pretrained(tiny_dir, progress=False).encode(
        [r["text"] for r in rows],
        [str(images / r["image"]) if r["image"] else None for r in rows],
        role="query",
    )
    np.testing.assert_allclose(emb, expected, atol=2e-5)
    written = json.loads((tmp_path / "out" / "meta.json").read_text())
    for key in ("model_path", "weights_sha256", "prompt", "scheme", "dtype", "versions", "input_sha256"):
        assert written[key], key
    assert written["prompt"]["name"] == "hierarchical" and written["versions"]["jax"]
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_resume_reuses_finished_shards(tiny_dir, images, tmp_path):
    src = _write_rows(images / "rows_resume.jsonl", _good_rows(images, 11))
    out = tmp_path / "out"
    first = run_embed(_cfg(tiny_dir), src, out, role="document")
    reference = np.load(out / "embeddings.npy")
    # Interrupted before the last two shards and the final files were written.
    for name in ("embeddings.npy", "ids.txt", "meta.json", "shards/00001.npy", "shards/00002.json"):
        (out / name).unlink()
    with pytest.raises(ValueError, match="pass --resume"):
        run_embed(_cfg(tiny_dir), src, out, role="document")
    with pytest.raises(ValueError, match=r"cannot resume.*\['config'\]"):
        run_embed(_cfg(tiny_dir, max_len=512), src, out, role="document", resume=True)
    again = run_embed(_cfg(tiny_dir), src, out, role="document", resume=True)
    assert first["resumed_rows"] == 0 and again["resumed_rows"] == 4  # only shard 0 survived intact
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), reference)


@pytest.fixture(scope="module")
def good_pair(tiny_dir, images):
    """What the two good rows around each bad one embed to on their own."""
    return Embedder.from_pretrained(tiny_dir, progress=False).encode(
        ["first", "third"], [None, str(images / "good.png")], role="query"
    )


BAD_ROWS = {
    "missing image file": ({"id": "b", "text": "x", "image": "missing.png"}, "image", "image file not found"),
    "truncated image": (
        {"id": "b", "text": "x", "image": "truncated.png"},
        "image",
        "cannot read image file",
    ),
    "unreadable image": ({"id": "b", "text": "x", "image": "text.png"}, "image", "cannot read image file"),
    "zero-size image": ({"id": "b", "text": "x", "image": "empty.png"}, "image", "zero-size image file"),
    "aspect ratio over 200": ({"id": "b", "text": "x", "image": "thin.png"}, "image", "aspect ratio 201.0"),
    "empty text, no image": ({"id": "b", "text": "  ", "image": None}, "text", "empty text and no image"),
    "invalid JSON line": ('{"id": "b", "text": ', "<line>", "invalid JSON"),
    "non-string text": ({"id": "b", "text": ["a", "list"]}, "text", "expected a string, got list"),
    "duplicate id": ({"id": "a0", "text": "again"}, "id", "duplicate id (first seen on line 1)"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_input_is_a_clear_error_or_skipped(case, tiny_dir, images, tmp_path, good_pair):
    bad, field, reason = BAD_ROWS[case]
    rows = [{"id": "a0", "text": "first"}, bad, {"id": "a2", "text": "third", "image": "good.png"}]
    src = _write_rows(images / f"bad_{field}_{abs(hash(case))}.jsonl", rows)
    with pytest.raises(ValueError) as info:
        run_embed(_cfg(tiny_dir), src, tmp_path / "strict", role="query")
    message = str(info.value)
    assert "line 2" in message and f"field {field!r}" in message and reason in message
    if field != "<line>":
        assert "(id 'b')" in message or "(id 'a0')" in message

    meta = run_embed(_cfg(tiny_dir), src, tmp_path / "lenient", role="query", skip_bad=True)
    skipped = [json.loads(line) for line in (tmp_path / "lenient" / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 1 and skipped[0]["line"] == 2 and skipped[0]["field"] == field
    assert reason in skipped[0]["reason"]
    ids = (tmp_path / "lenient" / "ids.txt").read_text().split()
    emb = np.load(tmp_path / "lenient" / "embeddings.npy")
    assert ids == ["a0", "a2"] and emb.shape == (2, meta["dim"]) and meta["skipped"] == 1
    np.testing.assert_allclose(emb, good_pair, atol=2e-5)


@pytest.mark.slow  # the command in subprocesses: the quick tier leaves it out
def test_cli_reports_errors_without_traceback(tiny_dir, images, tmp_path):
    src = _write_rows(images / "cli_bad.jsonl", [{"id": 1, "text": "ok"}, {"id": 2, "text": 5}])
    result = subprocess.run(
        [sys.executable, "-m", "g2e_jax.cli", "embed", "--config", CONFIG, "--input", str(src),
         "--output", str(tmp_path / "o"), "--role", "document", f"--config.model.path={tiny_dir}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "line 2 (id '2'), field 'text': expected a string, got int" in result.stderr
    typo = subprocess.run(
        [sys.executable, "-m", "g2e_jax.cli", "embed", "--config", CONFIG, "--input", str(src),
         "--output", str(tmp_path / "o2"), "--role", "document", "--config.modle.path=x"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert typo.returncode == 2 and "unknown config key 'modle.path'" in typo.stderr


def test_every_bad_row_is_named_in_one_error(tiny_dir, images, tmp_path):
    """Lines 3, 4 and 5 bad in three ways (two found while preprocessing, one while parsing): one error
    names all three, so the file is fixed once; past 20 bad rows the rest are counted."""
    rows = [
        {"id": "a1", "text": "first"},
        {"id": "a2", "text": "second", "image": "good.png"},
        {"id": "b3", "text": "x", "image": "missing.png"},
        '{"id": "b4", "text": ',
        {"id": "b5", "text": "x", "image": "text.png"},
        {"id": "a6", "text": "sixth"},
    ]
    src = _write_rows(images / "three_bad.jsonl", rows)
    with pytest.raises(ValueError) as info:
        run_embed(_cfg(tiny_dir), src, tmp_path / "strict", role="query")
    message = str(info.value).splitlines()
    assert message[0] == f"{src}: 3 bad rows (fix, or pass --skip-bad to set them aside in skipped.jsonl):"
    assert message[1].startswith("  line 3 (id 'b3'), field 'image': ")
    assert "image file not found" in message[1]
    assert message[2].startswith("  line 4, field '<line>': invalid JSON")
    assert message[3].startswith("  line 5 (id 'b5'), field 'image': ") and len(message) == 4

    # Only preprocessing finds these (no parse error), the first in shard 0 (4 rows per shard), the
    # others in later shards: the run stops at shard 0 and still names them all.
    many = [{"id": f"r{i}", "text": "t", "image": "missing.png" if i % 2 else None} for i in range(50)]
    src = _write_rows(images / "many_bad.jsonl", many)
    with pytest.raises(ValueError) as info:
        run_embed(_cfg(tiny_dir), src, tmp_path / "many", role="query")
    message = str(info.value).splitlines()
    assert message[0].startswith(f"{src}: 25 bad rows") and len(message) == 1 + 20 + 1
    assert [m.split(" (id")[0] for m in message[1:21]] == [f"  line {2 * k + 2}" for k in range(20)]
    assert message[-1] == "  ... and 5 more"
    assert not (tmp_path / "many" / "shards" / "00000.npy").exists()  # nothing encoded once it must fail
