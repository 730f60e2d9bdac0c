"""Checks that need several devices, run in a subprocess with 8 simulated CPU devices.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_checks.py OUT.json
Each check records measured differences; tests/test_sharded.py asserts on them.
"""

from __future__ import annotations

import json
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

jax.config.update("jax_default_matmul_precision", "highest")

from g2e_jax.train.loss import contrastive_loss, sharded_contrastive_loss  # noqa: E402
from g2e_jax.mesh import batch_sharding, make_mesh, shard_model  # noqa: E402


def max_diff(a, b):
    return float(max(jnp.max(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def loss_checks(results):
    rng = np.random.default_rng(0)
    n, d = 64, 16
    q = rng.standard_normal((n, d)).astype(np.float32)
    t = q + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    target_ids = rng.integers(0, 20, n)
    valid = np.arange(n) < 60
    mesh = make_mesh(data=4, fsdp=2, tensor=1)
    variants = {
        "filters off": {},
        "target ids": {"target_ids": True},
        "all filters": {"target_ids": True, "fn_query_threshold": 0.5, "fn_margin": 0.1, "hard_k": 8},
    }
    for name, kw in variants.items():
        filters = {k: v for k, v in kw.items() if k != "target_ids"}
        ids = jnp.asarray(target_ids) if kw.get("target_ids") else None

        def single(q, t):
            return contrastive_loss(
                q, t, temperature=0.05, target_ids=ids, valid=jnp.asarray(valid), **filters
            )

        (l1, m1), g1 = jax.value_and_grad(single, argnums=(0, 1), has_aux=True)(
            jnp.asarray(q), jnp.asarray(t)
        )
        sharded_fn = sharded_contrastive_loss(mesh, temperature=0.05, **filters)
        sh = batch_sharding(mesh, 2)
        qs, ts = jax.device_put(q, sh), jax.device_put(t, sh)
        vs = jax.device_put(valid, batch_sharding(mesh, 1))
        ids_s = None if ids is None else jax.device_put(ids, batch_sharding(mesh, 1))
        (l2, m2), g2 = jax.value_and_grad(lambda q, t: sharded_fn(q, t, vs, None, ids_s), argnums=(0, 1),
                                          has_aux=True)(qs, ts)  # fmt: skip
        # GSPMD: the plain loss under jit on sharded inputs.
        (l3, _), g3 = jax.jit(jax.value_and_grad(single, argnums=(0, 1), has_aux=True))(qs, ts)
        shards_with_grad = [float(jnp.abs(s.data).sum()) > 0 for s in g2[0].addressable_shards]
        results[f"loss/{name}"] = {
            "shard_map_loss_diff": abs(float(l1 - l2)), "shard_map_grad_diff": max_diff(g1, g2),
            "gspmd_loss_diff": abs(float(l1 - l3)), "gspmd_grad_diff": max_diff(g1, g3),
            "metrics_diff": max_diff(m1, m2), "masked": int(m1["masked"]),
            "devices_with_grad": sum(shards_with_grad), "devices": len(shards_with_grad),
        }  # fmt: skip


def step_checks(results):
    from g2e_jax.data.mmeb import read_train
    from g2e_jax.data.prepared import content_id
    from g2e_jax.data.synthetic import make_synthetic
    from g2e_jax.models.qwen2_vl import load
    from g2e_jax.models.qwen2_vl.tiny import make_tiny
    from g2e_jax.preprocess import Preprocessor
    from g2e_jax.train.batch import BatchShape, build_batch
    from g2e_jax.train.step import StepConfig, loss_and_grads

    tmp = tempfile.mkdtemp()
    model_dir = make_tiny(f"{tmp}/m")
    data = make_synthetic(f"{tmp}/d", train_rows=8, eval_queries=1)
    pre = Preprocessor.from_pretrained(model_dir, max_len=128)
    rows = read_train(data / "train", "SynShape", image_dir=data / "images")
    rows += read_train(data / "train", "SynI2T", image_dir=data / "images")
    qs = pre.prepare([r.qry for r in rows], [r.qry_image for r in rows], role="query")
    ts = pre.prepare([r.pos_text for r in rows], [r.pos_image for r in rows], role="document")
    pairs = [
        (q, t, content_id(r.qry, r.qry_image), content_id(r.pos_text, r.pos_image))
        for q, t, r in zip(qs, ts, rows)
    ]
    shape = BatchShape(chunks=2, cells=4, rows_per_cell=2, users=96, patches_per_cell=72, patch_dim=1176)
    batch = jax.tree.map(jnp.asarray, build_batch(pairs[: shape.pairs], shape, pre.pad_id))
    consts = {s: (jnp.asarray(pre.system_ids(r)), jnp.asarray(pre.header_ids))
              for s, r in (("query", "query"), ("target", "document"))}  # fmt: skip
    for grad_cache in (False, True):
        cfg = StepConfig(pad_id=pre.pad_id, max_patches_per_image=64, grad_cache=grad_cache)
        model = load(model_dir, progress=False)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        fn = jax.jit(lambda p, r, b: loss_and_grads(graphdef, p, r, b, consts, cfg))
        (l1, _), g1 = fn(params, rest, batch)
        single_hlo = fn.lower(params, rest, batch).as_text() if grad_cache else None
        mesh = make_mesh(data=2, fsdp=2, tensor=2)
        sharded = load(model_dir, progress=False)
        shard_model(sharded, mesh)
        graphdef, params, rest = nnx.split(sharded, nnx.Param, ...)
        cell_sharding = jax.tree.map(lambda x: NamedSharding(mesh, P(None, ("data", "fsdp"))) if x.ndim >= 2 else
                                     NamedSharding(mesh, P()), batch["query"])  # fmt: skip
        placed = dict(batch)
        placed["query"] = jax.device_put(batch["query"], cell_sharding)
        placed["target"] = jax.device_put(batch["target"], cell_sharding)
        # With GradCache, under ``jax.set_mesh``: the activation sharding constraints are active (the
        # trainer's setting), and must change the layout only; without, they are inactive (no mesh).
        if grad_cache:
            with jax.set_mesh(mesh):
                (l2, _), g2 = fn(params, rest, placed)
                hlo = fn.lower(params, rest, placed).as_text()
            results["constraints"] = {name: text.count("Sharding") + text.count("sharding_constraint")
                                      for name, text in (("mesh", hlo), ("no mesh", single_hlo))}  # fmt: skip
        else:
            (l2, _), g2 = fn(params, rest, placed)
        rel = np.sqrt(
            sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)))
        )
        rel /= np.sqrt(sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(g1)))
        sharded_leaves = sum(1 for x in jax.tree.leaves(params) if not x.sharding.is_fully_replicated)
        results[f"step/grad_cache={grad_cache}"] = {
            "loss_diff": abs(float(l1 - l2)), "grad_relative_l2": float(rel), "sharded_params": sharded_leaves,
        }  # fmt: skip


def main():
    assert jax.device_count() == 8, jax.device_count()
    results = {}
    loss_checks(results)
    step_checks(results)
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
