"""Data-parallel encoding and the sharded exact search on 8 simulated CPU devices vs 1 device.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/encode_mesh_checks.py MODEL_DIR OUT.json
tests/test_encode_mesh.py asserts on the recorded differences.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from PIL import Image

jax.config.update("jax_default_matmul_precision", "highest")

from g2e_jax import Embedder  # noqa: E402
from g2e_jax.saha import nearest  # noqa: E402
from g2e_jax.mesh import make_mesh  # noqa: E402


def main():
    assert jax.device_count() == 8, jax.device_count()
    model_dir, out = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (28 * (1 + i % 3), 56, 3), dtype=np.uint8)) for i in range(5)
    ]
    # 13 rows (not a multiple of 8): text-only, images of three sizes, lengths 2..60 words.
    texts = [f"row {i} " + "word " * (i * 7 % 60) for i in range(13)]
    rows_images = [images[i % 5] if i % 3 == 0 else None for i in range(13)]
    kw = dict(dtype="float32", batch_size=8, max_len=256, progress=False)
    one = Embedder.from_pretrained(model_dir, mesh=make_mesh(devices=jax.devices()[:1]), **kw)
    data = Embedder.from_pretrained(model_dir, **kw)  # every device on the data axis
    fsdp = Embedder.from_pretrained(model_dir, shard_weights=True, **kw)
    results = {"cells": [one.cells, data.cells, fsdp.cells], "mesh": dict(fsdp.mesh.shape)}
    results["fsdp_sharded_params"] = sum(
        not x.sharding.is_fully_replicated for x in jax.tree.leaves(fsdp.state)
    )
    for role in ("query", "document"):
        ref = one.encode(texts, rows_images, role=role)
        for name, emb in (("data", data), ("fsdp", fsdp)):
            got = emb.encode(texts, rows_images, role=role)
            results[f"{name}/{role}"] = float(np.abs(got - ref).max())
    results["programs"] = {"one": len(one.traces), "data": len(data.traces), "fsdp": len(fsdp.traces)}
    q = rng.standard_normal((37, 16)).astype(np.float32)
    c = rng.standard_normal((101, 16)).astype(np.float32)
    c[50] = c[7]  # an exact tie across devices: the lower index must win
    s1, i1 = nearest(q, c, 20, query_block=16, cand_block=8, devices=jax.devices()[:1])
    s8, i8 = nearest(q, c, 20, query_block=16, cand_block=8)
    brute = np.argsort(-(q[:, None].astype(np.float64) * c[None]).sum(-1), axis=1, kind="stable")[:, :20]
    results["nearest"] = {"same_index": bool((i1 == i8).all()), "score_diff": float(np.abs(s1 - s8).max()),
                          "equals_brute_force": bool((i8 == brute).all())}  # fmt: skip
    with open(out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
