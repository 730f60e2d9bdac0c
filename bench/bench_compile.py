"""Lower + compile time and StableHLO size of the training step and the encode program against depth.

    python bench/bench_compile.py                          # 2B widths, depths 2, 4, 8
    python bench/bench_compile.py --sizes 2b,7b --depths 2,4 --full   # and the real depth (minutes)

Each case is one program at Qwen2-VL-2B or -7B widths with ``depth`` decoder layers and as many vision
blocks (``--full``: the real 28 layers and 32 blocks), on ONE CPU device, on abstract arrays only
(``jax.ShapeDtypeStruct``: no weights allocated):

- ``step``: the training step as ``g2e-jax train`` compiles it (``train_step``: GradCache, DoRA on the
  default targets, ``train.remat`` = ``--remat``, AdamW), for one GradCache batch of ``--chunks`` chunks
  of ``--rows-per-cell`` rows with ``--users`` user tokens and ``--patches`` image patches per cell;
- ``encode``: the Embedder's program (``encode_cells``, the system prompt's prefix cache on) for one
  cell of ``--encode-rows`` rows of ``--users`` user tokens and ``--patches`` patches in
  ``--encode-images`` image slots.

Times: ``jax.jit(f).lower(*abstract)`` (tracing + lowering to StableHLO) and ``lowered.compile()``
(XLA), separately, with the persistent compilation cache off; size: characters of
``lowered.as_text()``. Each case runs in its own process (no tracing or XLA caches shared between
cases; the child's peak RSS is reported too). Ratios are to the smallest depth of the same program
and width. The cores other processes kept busy meanwhile are measured (``bg cores``): compile times
on a loaded machine are not comparable with an idle one's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from common import BUSY_CORES, CpuMeter, csv_list

REPO = Path(__file__).resolve().parents[1]
# Qwen2-VL-2B / -7B (their config.json): text widths; both have 28 decoder layers and 32 vision blocks
# of width 1280.
WIDTHS = {
    "2b": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
           "num_key_value_heads": 2, "tie": True},
    "7b": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
           "num_key_value_heads": 4, "tie": False},
}  # fmt: skip
FULL_DEPTH = (28, 32)  # decoder layers, vision blocks
SYS_TOKENS, HEADER_TOKENS, PATCH_DIM = 40, 5, 1176


def width_config(size: str, layers: int, blocks: int):
    """Qwen2-VL at ``size``'s widths with ``layers`` decoder layers and ``blocks`` vision blocks."""
    from g2e_jax.models.qwen2_vl import Qwen2VLConfig, TextConfig, VisionConfig
    from g2e_jax.models.qwen2_vl.tiny import with_token_ids

    w = dict(WIDTHS[size])
    tie = w.pop("tie")
    return with_token_ids(Qwen2VLConfig(
        text=TextConfig(**w, num_hidden_layers=layers, mrope_section=(16, 24, 24), rope_theta=1e6),
        vision=VisionConfig(depth=blocks, embed_dim=1280, num_heads=16, mlp_ratio=4,
                            out_hidden_size=w["hidden_size"]),
        tie_word_embeddings=tie,
    ))  # fmt: skip


def _abstract(tree):
    import jax

    return jax.tree.map(lambda x: None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def step_program(cfg, args):
    """(jitted, abstract args) of the training step."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from g2e_jax.adapters.lora import AdapterConfig
    from g2e_jax.mesh import BATCH_AXES, make_mesh
    from g2e_jax.models.qwen2_vl.model import Qwen2VL
    from g2e_jax.train.batch import BatchShape
    from g2e_jax.train.report import abstract_batch, abstract_train_state
    from g2e_jax.train.step import StepConfig, make_optimizer, train_step

    dtype = jnp.dtype(args.dtype)
    mesh = make_mesh()
    tx = make_optimizer(learning_rate=5e-5, total_steps=1500, warmup_steps=100)
    adapter = AdapterConfig(kind="dora", rank=8, alpha=64.0, dropout=0.0)
    graphdef, params, rest, opt_state = abstract_train_state(
        lambda: Qwen2VL(cfg, dtype=dtype, param_dtype=dtype), adapter, tx, mesh
    )
    step_cfg = StepConfig(grad_cache=True, remat=args.remat, max_patches_per_image=args.max_patches_per_image)
    shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    fn = jax.jit(lambda p, r, o, b, c, k: train_step(graphdef, p, r, o, b, c, k, tx=tx, cfg=step_cfg),
                 donate_argnums=(0, 2), out_shardings=(*shardings, None))  # fmt: skip
    shape = BatchShape(chunks=args.chunks, cells=1, rows_per_cell=args.rows_per_cell, users=args.users,
                       patches_per_cell=args.patches, patch_dim=PATCH_DIM)  # fmt: skip
    batch = abstract_batch(shape, 0, lambda n: NamedSharding(mesh, P(None, BATCH_AXES, *[None] * (n - 2))))
    ids = (jax.ShapeDtypeStruct((SYS_TOKENS,), jnp.int32), jax.ShapeDtypeStruct((HEADER_TOKENS,), jnp.int32))
    consts = {s: ids for s in ("query", "target")}
    key = jax.eval_shape(lambda: jax.random.key(0))
    return fn, (params, rest, opt_state, batch, consts, key), {}


def encode_program(cfg, args):
    """(jitted, abstract args, static kwargs) of the Embedder's encode program (one cell)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from g2e_jax.models.qwen2_vl.model import Qwen2VL
    from g2e_jax.preprocess import collate
    from g2e_jax.programs.encode import encode_cells

    dtype = jnp.dtype(args.dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2VL(cfg, dtype=dtype, param_dtype=dtype)))
    state = _abstract(state)
    sys_ids = jax.ShapeDtypeStruct((SYS_TOKENS,), jnp.int32)
    header_ids = jax.ShapeDtypeStruct((HEADER_TOKENS,), jnp.int32)
    # The prefix cache's (k, v) as the model makes them, whatever their layout.
    prefix = jax.eval_shape(lambda s, ids: nnx.merge(graphdef, s).prefix_kv(ids), state, sys_ids)
    arrays = collate([], batch_size=args.encode_rows, users=args.users, patches=args.patches, pad_id=0,
                     patch_dim=PATCH_DIM, images=args.encode_images, pixel_dtype=args.dtype)  # fmt: skip
    arrays = {
        k: None if v is None else jax.ShapeDtypeStruct((1, *np.shape(v)), v.dtype) for k, v in arrays.items()
    }
    static = ("scheme", "pad_id", "max_patches_per_image")
    fn = jax.jit(functools.partial(encode_cells, graphdef, []), static_argnames=static)
    statics = {"scheme": "gen2embed", "pad_id": 0, "max_patches_per_image": args.max_patches_per_image}
    return fn, (state, sys_ids, header_ids, prefix), {**arrays, **statics}


def run_case(args) -> dict:
    """One program at one width and depth, in this process: its timings and size."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    assert jax.device_count() == 1, jax.devices()
    layers, blocks = FULL_DEPTH if args.case_depth == "full" else (int(args.case_depth),) * 2
    cfg = width_config(args.case_size, layers, blocks)
    build = {"step": step_program, "encode": encode_program}[args.case_program]
    fn, positional, keywords = build(cfg, args)
    start = time.perf_counter()
    lowered = fn.lower(*positional, **keywords)
    lower_s = time.perf_counter() - start
    hlo_chars = len(lowered.as_text())
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    return {
        "program": args.case_program, "size": args.case_size, "depth": args.case_depth, "layers": layers,
        "vision_blocks": blocks, "lower_s": lower_s, "compile_s": compile_s, "hlo_chars": hlo_chars,
        "temp_bytes": None if mem is None else int(mem.temp_size_in_bytes),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip


def child(args, program: str, size: str, depth: str, log) -> dict:
    """``run_case`` in a fresh process on one CPU device; its result with the background load."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, __file__, *sys.argv[1:], "--case-program", program, "--case-size", size,
               "--case-depth", depth]  # fmt: skip
    with CpuMeter() as meter:
        proc = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=args.case_timeout, check=False
        )
    if proc.returncode:
        log(proc.stderr[-3000:])
        return {
            "program": program,
            "size": size,
            "depth": depth,
            "error": proc.stderr.strip().splitlines()[-1:],
        }
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["bg_cores"] = meter.background_cores
    return result


def add_ratios(results: list[dict]) -> None:
    """Each result's lower, compile, lower + compile and StableHLO size over the smallest depth's."""
    for r in results:
        same = [
            b for b in results if (b["program"], b["size"]) == (r["program"], r["size"]) and "error" not in b
        ]
        if "error" in r or not same:
            continue
        base = min(same, key=lambda b: b["layers"])
        r["ratio_to"] = base["depth"]
        r["lower_ratio"] = r["lower_s"] / base["lower_s"]
        r["compile_ratio"] = r["compile_s"] / base["compile_s"]
        r["total_ratio"] = (r["lower_s"] + r["compile_s"]) / (base["lower_s"] + base["compile_s"])
        r["hlo_ratio"] = r["hlo_chars"] / base["hlo_chars"]


def print_table(results: list[dict]) -> None:
    print(f"\n{'program':8} {'width':5} {'layers+blocks':>13} {'lower s':>8} {'compile s':>10} {'total s':>8} "
          f"{'StableHLO chars':>16} {'lower x':>8} {'compile x':>9} {'total x':>8} {'HLO x':>6} "
          f"{'RSS MiB':>8} {'bg cores':>8}")  # fmt: skip
    for r in results:
        depth = f"{r.get('layers', '?')}+{r.get('vision_blocks', '?')}" if "layers" in r else r["depth"]
        if "error" in r:
            print(f"{r['program']:8} {r['size']:5} {depth:>13} failed: {r['error']}")
            continue
        bg = r.get("bg_cores")
        flag = "" if bg is None or bg <= BUSY_CORES else " *"
        print(f"{r['program']:8} {r['size']:5} {depth:>13} {r['lower_s']:8.1f} {r['compile_s']:10.1f} "
              f"{r['lower_s'] + r['compile_s']:8.1f} {r['hlo_chars']:16,d} {r['lower_ratio']:8.2f} "
              f"{r['compile_ratio']:9.2f} {r['total_ratio']:8.2f} {r['hlo_ratio']:6.2f} {r['peak_rss_mib']:8.0f} "
              f"{'-' if bg is None else f'{bg:.2f}'}{flag:>2}")  # fmt: skip
    if any((r.get("bg_cores") or 0) > BUSY_CORES for r in results):
        print(
            f"* other processes kept more than {BUSY_CORES} cores busy meanwhile: not an idle machine's time"
        )


def machine_info() -> dict:
    import jax
    import jaxlib

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        commit, dirty = None, ""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": None if not commit else commit + (" (dirty)" if dirty.strip() else ""),
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__},
    }  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2b", help="widths: 2b, 7b (comma-separated)")
    parser.add_argument("--programs", default="step,encode", help="step, encode (comma-separated)")
    parser.add_argument(
        "--depths", default="2,4,8", help="decoder layers, as many vision blocks (comma-separated)"
    )
    parser.add_argument(
        "--full", action="store_true", help="also the real depth: 28 layers + 32 vision blocks"
    )
    parser.add_argument(
        "--remat", default="layers", help="the step's train.remat (none, layers, layers_dots, ...)"
    )
    parser.add_argument("--dtype", default="bfloat16", help="parameters and compute")
    parser.add_argument("--chunks", type=int, default=2, help="GradCache chunks of the step")
    parser.add_argument("--rows-per-cell", type=int, default=4, help="rows per chunk (one cell: one device)")
    parser.add_argument("--users", type=int, default=960, help="user-segment tokens per row")
    parser.add_argument("--patches", type=int, default=4096, help="packed image patches per cell (and side)")
    parser.add_argument("--max-patches-per-image", type=int, default=1024)
    parser.add_argument("--encode-rows", type=int, default=8, help="rows of the encode program's cell")
    parser.add_argument(
        "--encode-images", type=int, default=4, help="image slots of the encode program's cell"
    )
    parser.add_argument("--case-timeout", type=float, default=7200, help="seconds one case may take")
    parser.add_argument("--output", default="bench_compile.json")
    parser.add_argument("--case-program", help=argparse.SUPPRESS)
    parser.add_argument("--case-size", help=argparse.SUPPRESS)
    parser.add_argument("--case-depth", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case_program:  # a child: one case, its JSON on the last line
        print(json.dumps(run_case(args)), flush=True)
        return

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    depths = [str(int(d)) for d in csv_list(args.depths)] + (["full"] if args.full else [])
    results = []
    for size in csv_list(args.sizes):
        for program in csv_list(args.programs):
            for depth in depths:
                log(f"{program} at {size} widths, depth {depth} ...")
                results.append(child(args, program, size, depth, log))
                r = results[-1]
                if "error" not in r:
                    log(f"  lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s, "
                        f"{r['hlo_chars']:,d} StableHLO chars, bg cores {r['bg_cores']}")  # fmt: skip
    add_ratios(results)
    print_table(results)
    meta = {**machine_info(), "args": {k: v for k, v in vars(args).items() if not k.startswith("case_")}}
    with open(args.output, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    log(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
