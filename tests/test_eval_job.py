"""``g2e-jax eval`` end to end on a small synthetic set: its scores recomputed by hand from Embedder
outputs, and the candidate cache hit only by the same model and prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest

from g2e_jax.cli import main

SUBSETS = ("SynShape", "SynT2I")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from g2e_jax.data.synthetic import make_synthetic

    return make_synthetic(
        tmp_path_factory.mktemp("eval") / "syn", train_rows=2, eval_queries=3, num_candidates=4, image_size=56
    )


def _eval(model, data, out, *extra):
    args = [
        "eval",
        f"--config.model.path={model}",
        f"--config.data.root={data / 'eval'}",
        f"--config.data.image_dir={data / 'images'}",
        f"--config.data.groups_file={data / 'groups.json'}",
        f"--config.subsets={SUBSETS!r}",
        f"--config.output_dir={out}",
        "--config.model.dtype=float32",
        "--config.max_len=256",
        *extra,
    ]
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_eval_end_to_end_and_its_cache(tiny_dir, data, tmp_path):
    from g2e_jax import Embedder
    from g2e_jax.data.mmeb import read_eval
    from g2e_jax.models.qwen2_vl.tiny import make_tiny

    cache = f"--config.cache_dir={tmp_path / 'cache'}"
    first = _eval(tiny_dir, data, tmp_path / "a", cache)
    (run,) = first.values()
    assert sorted(run["subsets"]) == sorted(SUBSETS)
    assert (tmp_path / "a/results.md").is_file() and (tmp_path / "a/results.png").stat().st_size > 1000

    # Precision@1 by hand: per row, encode its query and its own candidates; correct when candidate 0 wins.
    emb = Embedder.from_pretrained(tiny_dir, dtype="float32", max_len=256, progress=False)
    for subset in SUBSETS:
        rows = read_eval(data / "eval", subset, image_dir=data / "images")
        correct = 0
        for row in rows:
            q = emb.encode([row.qry_text], [row.qry_image], role="query")
            c = emb.encode(list(row.tgt_texts), list(row.tgt_images), role="document", subset=subset)
            correct += int(np.argmax(c @ q[0]) == 0)
        assert run["subsets"][subset]["precision_at_1"] == pytest.approx(correct / len(rows))
        assert run["subsets"][subset]["cached"] is False
    assert run["summary"]["overall"] == pytest.approx(
        np.mean([run["subsets"][s]["precision_at_1"] for s in SUBSETS])
    )

    # The same model and prompt hit the cache with the same scores; another prompt or model misses it.
    again = next(iter(_eval(tiny_dir, data, tmp_path / "b", cache).values()))
    assert all(again["subsets"][s]["cached"] for s in SUBSETS)
    assert {s: again["subsets"][s]["precision_at_1"] for s in SUBSETS} == {
        s: run["subsets"][s]["precision_at_1"] for s in SUBSETS
    }
    plain = next(iter(_eval(tiny_dir, data, tmp_path / "c", cache, "--config.prompt.preset=plain").values()))
    assert not any(plain["subsets"][s]["cached"] for s in SUBSETS)
    other_model = make_tiny(tmp_path / "other", seed=1)
    other = next(iter(_eval(other_model, data, tmp_path / "d", cache).values()))
    assert not any(other["subsets"][s]["cached"] for s in SUBSETS)
