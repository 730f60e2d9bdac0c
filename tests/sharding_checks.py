"""Sharding reports and ahead-of-time memory checks on 8 simulated CPU devices, abstract arrays only.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_checks.py OUT.json [--full
[--remat=layers]]
tests/test_sharding_report.py asserts on OUT.json. ``--full`` instead compiles the whole 7B model (28 layers,
32 vision blocks; minutes on 2 cores) for the record, and prints its report and memory analysis.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from g2e_jax.adapters.lora import AdapterConfig
from g2e_jax.aot import AheadOfTime
from g2e_jax.mesh import BATCH_AXES, make_mesh
from g2e_jax.models.qwen2_vl import Qwen2VLConfig, TextConfig, VisionConfig
from g2e_jax.models.qwen2_vl.config import tiny_config
from g2e_jax.models.qwen2_vl.model import Qwen2VL
from g2e_jax.models.qwen2_vl.tiny import with_token_ids
from g2e_jax.train.batch import BatchShape
from g2e_jax.train.report import abstract_batch, abstract_train_state, mesh_advice, sharding_report
from g2e_jax.train.step import StepConfig, make_optimizer, train_step

GOLDEN = Path(__file__).resolve().parent / "golden" / "sharding_tiny.txt"


def _per_layer_ndim(row) -> int:
    """A parameter's dimensions per layer: a stacked parameter's leading ``layers`` axis not counted."""
    return sum(1 for name in row.logical if name != "layers")


def width_config(size: str, layers: int, blocks: int) -> Qwen2VLConfig:
    """Qwen2-VL-2B or -7B widths (their config.json) at ``layers`` decoder layers and ``blocks`` vision blocks."""
    text = {
        "2b": dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_attention_heads=12,
            num_key_value_heads=2,
        ),
        "7b": dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_attention_heads=28,
            num_key_value_heads=4,
        ),
    }[size]
    return with_token_ids(
        Qwen2VLConfig(
            text=TextConfig(**text, num_hidden_layers=layers, mrope_section=(16, 24, 24), rope_theta=1e6),
            vision=VisionConfig(
                depth=blocks, embed_dim=1280, num_heads=16, mlp_ratio=4, out_hidden_size=text["hidden_size"]
            ),
            tie_word_embeddings=size == "2b",
        )
    )


def plan(cfg, mesh, dtype=jnp.bfloat16, kind="dora"):
    tx = make_optimizer(learning_rate=5e-5, total_steps=1500, warmup_steps=100)
    # Adapter dropout 0 (the recipe has 0.1; dropout > 0 traces too: test_train_step.py).
    adapter = AdapterConfig(kind=kind, rank=8, alpha=64.0, dropout=0.0)
    state = abstract_train_state(lambda: Qwen2VL(cfg, dtype=dtype, param_dtype=dtype), adapter, tx, mesh)
    return tx, state


def compile_step(cfg, mesh, tx, state, shape: BatchShape, limit=None, remat="none"):
    """The training step (GradCache, ``train.remat`` = ``remat``) at these widths compiled for an
    abstract batch; its AheadOfTime."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    graphdef, params, rest, opt_state = state
    step_cfg = StepConfig(grad_cache=True, remat=remat, max_patches_per_image=1024)
    shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    fn = jax.jit(
        lambda p, r, o, b, c, k: train_step(graphdef, p, r, o, b, c, k, tx=tx, cfg=step_cfg),
        donate_argnums=(0, 2),
        out_shardings=(*shardings, None),
    )
    batch = abstract_batch(shape, 0, lambda n: NamedSharding(mesh, P(None, BATCH_AXES, *[None] * (n - 2))))
    consts = {s: (jnp.zeros(40, jnp.int32), jnp.zeros(5, jnp.int32)) for s in ("query", "target")}
    aot = AheadOfTime(
        fn,
        "training step",
        mesh=mesh,
        limit=limit,
        limit_source="test limit",
        advice=mesh_advice(dict(mesh.shape), jax.device_count()),
    )
    aot.compile(params, rest, opt_state, batch, consts, jax.random.key(0))
    return aot


def width_checks(results):
    mesh = make_mesh(fsdp=8)
    for size in ("2b", "7b"):
        _, state = plan(width_config(size, layers=2, blocks=2), mesh)
        report = sharding_report(state[1], state[2], state[3], mesh)
        total, local = report.bytes()
        meant = report.bytes([r for r in report.rows if r.replicated and not r.fallback])
        results[f"widths/{size}"] = {
            "total": total,
            "per_device": local,
            "replicated_by_rule": meant[1],
            "fallbacks": [r.path for r in report.fallbacks],
            "opt_total": report.opt_total,
            "opt_per_device": report.opt_per_device,
            "sharded_kernels": sum(
                1 for r in report.rows if _per_layer_ndim(r) == 2 and not r.replicated and not r.trainable
            ),
            "frozen_kernels": sum(1 for r in report.rows if _per_layer_ndim(r) == 2 and not r.trainable),
        }


def tiny_golden(results, update: bool):
    """The tiny model's full report on a data 2 x fsdp 2 x tensor 2 mesh, compared with the golden file."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    cfg = tiny_config()
    _, state = plan(cfg, mesh, dtype=jnp.float32, kind="lora")
    text = sharding_report(state[1], state[2], state[3], mesh).text()
    if update:
        GOLDEN.write_text(text)
    results["tiny/golden_equal"] = text == GOLDEN.read_text()
    results["tiny/text"] = text


def fallback_checks(results):
    """A parameter that declares no logical axes and one whose dimension the mesh does not divide are
    both reported."""
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from g2e_jax.mesh import declared

    mesh = make_mesh(fsdp=8)
    rep = NamedSharding(mesh, P())

    def param(shape, axes=None):
        value = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=rep)
        return nnx.Param(value, **(declared(axes) if axes else {}))

    state = nnx.State(
        {
            "text": {"embed_tokens": {"embedding": param((100, 36), ("vocab", "embed"))}},
            "mystery": {"kernel": param((64, 64))},
            "visual": {"patch_embed": {"kernel": param((1176, 64), ("patch", "vision_embed"))}},
        }
    )
    report = sharding_report(state, nnx.State({}), {}, mesh)
    results["fallback/rows"] = {r.path: r.fallback for r in report.rows}
    results["fallback/summary"] = report.summary()


def memory_checks(results):
    """7B widths, 1 layer + 1 vision block, fsdp=8: memory analysis; a too-small limit is refused."""
    mesh = make_mesh(fsdp=8)
    cfg = width_config("7b", layers=1, blocks=1)
    tx, state = plan(cfg, mesh)
    # Two chunks: with one, XLA flattens GradCache's loops and holds both passes' buffers at once (about
    # twice the temporaries on 8 devices; docs of issue 18).
    shape = BatchShape(chunks=2, cells=8, rows_per_cell=1, users=32, patches_per_cell=64, patch_dim=1176)
    aot = compile_step(cfg, mesh, tx, state, shape)
    need = next(iter(aot.memory.values()))
    results["memory/7b_1_layer"] = {"need": need, "describe": aot.describe()}
    aot.limit = need["total"] // 2  # the same program against a smaller device (no second compile)
    try:
        aot.check(need)
        results["memory/too_small"] = None
    except ValueError as e:
        results["memory/too_small"] = str(e)
    replicated = make_mesh(data=8)
    results["memory/advice_data8"] = mesh_advice(dict(replicated.shape), 8)


def remat_checks(results):
    """Per-device temporaries of the step at depth 1 and 4 (decoder layers and vision blocks alike),
    with and without per-layer remat, at a small width and fsdp=8: without it the backward holds every
    layer's activations (f32 attention scores included), with it each layer's input and one layer's
    activations."""
    mesh = make_mesh(fsdp=8)
    # Narrow layers, long sequences: activations, not (gathered, on CPU float32-converted) weights, dominate.
    text = {
        "vocab_size": 1024,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    shape = BatchShape(chunks=2, cells=8, rows_per_cell=2, users=512, patches_per_cell=1024, patch_dim=1176)
    for depth in (1, 4):
        cfg = with_token_ids(
            Qwen2VLConfig(
                text=TextConfig(**text, num_hidden_layers=depth, mrope_section=(8, 12, 12), rope_theta=1e6),
                vision=VisionConfig(
                    depth=depth, embed_dim=128, num_heads=2, mlp_ratio=4, out_hidden_size=128
                ),
                tie_word_embeddings=False,
            )
        )
        tx, state = plan(cfg, mesh)
        for remat in ("none", "layers"):
            need = next(iter(compile_step(cfg, mesh, tx, state, shape, remat=remat).memory.values()))
            results[f"remat/{remat}/depth{depth}"] = need
    # What per-layer remat must keep per added (layer + block): its bf16 input, per device (one cell).
    user_tokens = shape.rows_per_cell * (shape.users + 40 + 5 + shape.patches_per_cell // 4)
    results["remat/residual_bytes"] = 2 * (user_tokens * text["hidden_size"] + shape.patches_per_cell * 128)


def full_7b(remat: str):
    """The whole 7B model, fsdp=8: the report and the step's memory analysis at ``train.remat`` =
    ``remat`` (the paper's batch per device: GradCache chunks of 4 rows, 960 user tokens, 4 images
    of 448 x 448 per cell)."""
    mesh = make_mesh(fsdp=8)
    cfg = width_config("7b", layers=28, blocks=32)
    tx, state = plan(cfg, mesh)
    report = sharding_report(state[1], state[2], state[3], mesh)
    print(report.summary())
    shape = BatchShape(chunks=2, cells=8, rows_per_cell=4, users=960, patches_per_cell=4096, patch_dim=1176)
    print(compile_step(cfg, mesh, tx, state, shape, remat=remat).describe())


def main():
    assert jax.device_count() == 8, jax.device_count()
    if "--full" in sys.argv:
        full_7b(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--remat=")), "none"))
        return
    results = {}
    for check in (width_checks, tiny_golden, fallback_checks, memory_checks, remat_checks):
        start = time.perf_counter()
        check(results) if check is not tiny_golden else check(results, update="--update-golden" in sys.argv)
        print(f"{check.__name__}: {time.perf_counter() - start:.1f} s", flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=2, default=lambda x: np.asarray(x).tolist())


if __name__ == "__main__":
    main()
