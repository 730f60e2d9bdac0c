"""``g2e-jax train``: a run's set-up and its loop around ``train_step``.

The batches come from ``train.feed``, the checkpoint format from ``g2e_jax.checkpoints``, the
periodic evaluation from ``train.evaluate`` and the timing record from ``train.clock``.

One process per host (``jax.distributed``), one mesh over all devices, parameters sharded by the
rules table, each process building only its own cells of every global batch. Orbax checkpoints
hold the trainable parameters, the optimizer state and the step; the data order (sampler) and the
dropout keys are functions of (seed, step), so a resumed run is exactly an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from g2e_jax import checkpoints, plots
from g2e_jax.adapters.lora import find_stacks, trainable_filter
from g2e_jax.aot import device_memory_limit
from g2e_jax.check_data import check_before_run
from g2e_jax.config_sections import prompt_fields
from g2e_jax.config_utils import config_to_json
from g2e_jax.data.clusters import ClusterBatchSampler
from g2e_jax.distributed import init_distributed, wait_for_lost_process
from g2e_jax.io import write_atomic
from g2e_jax.mesh import BATCH_AXES, make_mesh, shard_model
from g2e_jax.models import load
from g2e_jax.paths import absolute_config_paths
from g2e_jax.preprocess import Preprocessor
from g2e_jax.train.batch import BatchShape, fit_sides
from g2e_jax.train.clock import RunClock
from g2e_jax.train.data import TrainData
from g2e_jax.train.evaluate import evaluate_now
from g2e_jax.train.feed import BatchesAhead, batch_spec
from g2e_jax.train.guards import (
    BadSteps,
    TrainingStopped,
    checkpoint_bytes,
    preflight_workdir,
    record_skipped,
    skipped_file,
)
from g2e_jax.train.report import abstract_batch, before_first_step
from g2e_jax.train.step import StepConfig, lr_schedule, make_optimizer, schedule_values, train_step


@dataclasses.dataclass
class Run:
    """Everything a training run holds between steps."""

    cfg: ml_collections.ConfigDict
    workdir: Path
    mesh: object
    graphdef: object
    params: object
    rest: object
    opt_state: object
    step_cfg: StepConfig
    consts: dict
    shape: BatchShape
    sampler: ClusterBatchSampler
    data: TrainData
    preprocessor: Preprocessor
    schedule: dict | None = None  # the learning-rate schedule's numbers, arguments of the step (replicated)
    bad_steps: int = 0  # non-finite steps so far (kept in the checkpoints)
    sides: dict | None = None  # the largest (users, patches) per side (train.shape_from_data); None: capacity


def setup(cfg, workdir: str | Path) -> Run:
    init_distributed(cfg)
    workdir = Path(workdir)
    preflight_workdir(workdir)  # writable: fail before loading anything
    check_before_run(cfg, "train")
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, dcn_data=cfg.mesh.dcn_data,
                     dcn_fsdp=cfg.mesh.dcn_fsdp)  # fmt: skip
    preprocessor = Preprocessor.from_pretrained(
        cfg.model.path, prompt=prompt_fields(cfg.prompt), scheme=cfg.prompt.scheme, max_len=cfg.max_len,
        image_resolution=cfg.image_resolution,
    )  # fmt: skip
    model = load(cfg.model.path, dtype=cfg.model.dtype, compute_dtype=cfg.model.compute_dtype,
                 progress=jax.process_index() == 0)  # fmt: skip
    adapter = checkpoints.apply_run_adapters(model, cfg, rngs=nnx.Rngs(params=cfg.train.seed, dropout=cfg.train.seed + 1))
    shard_model(model, mesh)
    graphdef, params, rest = nnx.split(model, trainable_filter(adapter), ...)
    t = cfg.train
    tx = make_optimizer(learning_rate=t.learning_rate, total_steps=t.steps, warmup_steps=t.warmup_steps,
                        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm)  # fmt: skip
    # Every leaf on the mesh (scalars like Adam's count replicated), so step 1 and step 2 see the
    # same input shardings and share one program.
    replicated = NamedSharding(mesh, P())
    opt_state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
        jax.jit(tx.init)(params),
    )
    step_cfg = StepConfig(
        temperature=t.temperature, grad_cache=t.grad_cache, remat=t.remat, mask_same_target=t.mask_same_target,
        mask_same_query=t.mask_same_query, fn_query_threshold=t.fn_query_threshold, fn_margin=t.fn_margin,
        hard_k=t.hard_k, scheme=preprocessor.prompt.scheme, pad_id=preprocessor.pad_id,
        max_patches_per_image=t.max_patches_per_image, prefix_cache=t.prefix_cache,
        scan_unroll=t.scan_unroll,
    )  # fmt: skip
    consts = {side: (jnp.asarray(preprocessor.system_ids(role)), jnp.asarray(preprocessor.header_ids))
              for side, role in (("query", "query"), ("target", "document"))}  # fmt: skip
    data = TrainData.from_config(cfg, preprocessor)
    sampler = ClusterBatchSampler(
        data.cluster_sizes(), t.clusters_per_batch, seed=t.seed, batch_subsets=t.batch_subsets
    )
    batch_devices = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    c = t.rows_per_cell
    cells = (
        batch_devices
        if t.grad_cache
        else batch_devices * math.ceil(sampler.max_pairs() / (batch_devices * c))
    )
    chunks = math.ceil(sampler.max_pairs() / (cells * c))
    users = min(t.users, cfg.max_len - len(consts["query"][0]) - len(consts["query"][1]))
    shape = BatchShape(chunks=chunks, cells=cells, rows_per_cell=c, users=users,
                       patches_per_cell=t.patches_per_cell or None, patch_dim=preprocessor.config.vision.patch_dim)  # fmt: skip
    sides = None
    if t.get("shape_from_data"):
        need = data.side_maxima(c, progress=jax.process_index() == 0)
        need[:, 1] = np.minimum(need[:, 1], shape.patches_per_cell or 0)  # a cell's own overflow: at collation
        sides = fit_sides(shape, need, per_octave=t.bucket_steps)
        if jax.process_index() == 0:
            print("one batch shape fitted to the data: " + "; ".join(
                f"{side} {u} user tokens, {p or 'no'} image patches per cell" for side, (u, p) in sides.items()
            ), flush=True)  # fmt: skip
    schedule = jax.device_put(schedule_values(t.learning_rate, t.steps, t.warmup_steps), replicated)
    return Run(cfg, workdir, mesh, graphdef, params, rest, opt_state, step_cfg, consts, shape, sampler, data,
               preprocessor, schedule=schedule, sides=sides)  # fmt: skip


def step_function(run: Run):
    """``train_step`` jitted as the loop calls it: (params, rest, opt_state, batch, consts, key,
    schedule) -> (params, opt_state, metrics), parameters and optimizer state donated. Outputs keep
    the inputs' shardings, so step 2 reuses step 1's program. The optimizer is built inside from
    ``schedule`` (``run.schedule``: learning rate, steps, warm-up as arguments), so the program does
    not depend on those numbers: another step count or learning rate reuses it (the compilation
    cache) instead of compiling again, minutes at full width."""
    shardings = jax.tree.map(lambda x: x.sharding, (run.params, run.opt_state))
    t = run.cfg.train

    def step(p, r, o, b, c, key, schedule):
        tx = make_optimizer(**schedule, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm)
        return train_step(run.graphdef, p, r, o, b, c, key, tx=tx, cfg=run.step_cfg)

    return jax.jit(step, donate_argnums=(0, 2), out_shardings=(*shardings, None))


# --- checkpoints ------------------------------------------------------------------------------------------


def _manager(run: Run):
    return checkpoints.open_manager(run.workdir, keep=run.cfg.train.keep_checkpoints,
                                    async_save=run.cfg.train.async_checkpoint)  # fmt: skip


def save_checkpoint(run: Run, manager, step: int, *, wait: bool = False) -> None:
    meta = {
        "step": step,
        "seed": run.cfg.train.seed,
        "config": json.loads(config_to_json(run.cfg)),
        "bad_steps": run.bad_steps,
    }
    checkpoints.save(manager, step, params=run.params, opt_state=run.opt_state, meta=meta, wait=wait)


def restore_latest(run: Run, manager) -> int:
    """Restores the newest readable checkpoint into ``run``; returns its step, 0 when there is none."""
    stacks = find_stacks(nnx.merge(run.graphdef, run.params, run.rest))  # how a per-layer (v1) checkpoint stacks
    step, opt_state, meta = checkpoints.restore_training(manager, params=run.params, opt_state=run.opt_state,
                                                         stacks=stacks)  # fmt: skip
    if meta is not None:
        run.opt_state = opt_state
        run.bad_steps = int(meta.get("bad_steps", 0))
    return step


# --- the loop ---------------------------------------------------------------------------------------------


class _Preempted:
    """SIGTERM (preemption) sets a flag; the loop saves a checkpoint and stops after the current step."""

    def __init__(self):
        self.flag = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _write_metrics(path: Path, records: list[dict], keep_until: int | None = None) -> None:
    """Appends records; on resume first drops the lines after the restored step (they are
    recomputed, identically, from the checkpoint)."""
    if keep_until is not None and path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= keep_until]
        write_atomic(path, "".join(line + "\n" for line in kept))
    if records:
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


def train(cfg, workdir: str | Path, *, progress: bool = True) -> dict:
    """Runs (or resumes) training; returns the last metrics."""
    if cfg.model.path is None:
        raise ValueError("no model: set --config.model.path=/path/to/hf_model_dir")
    # config.json and the checkpoints' meta are read back from anywhere (export-hf, eval, embed).
    cfg = absolute_config_paths(cfg)
    if cfg.model.get("adapter") is not None:
        raise ValueError("model.adapter is for mine/eval/embed; train starts from a PEFT folder with "
                         "--config.adapter.init_from=DIR")
    if cfg.adapter.get("init_from") is not None:  # config.json must not depend on the working directory
        cfg.adapter.init_from = str(Path(cfg.adapter.init_from).absolute())
    clock = RunClock()
    run = setup(cfg, workdir)
    lead = jax.process_index() == 0
    preflight_workdir(run.workdir, checkpoint_bytes(run.params, run.opt_state))  # room for a checkpoint
    manager = _manager(run)
    start = restore_latest(run, manager)
    if lead and start:
        print(f"resuming from the checkpoint at step {start}", flush=True)
    metrics_file = run.workdir / "metrics.jsonl"
    skipped = skipped_file(run.workdir)
    _write_metrics(skipped, [], keep_until=start)  # a resumed run records the same skips again
    if lead:
        write_atomic(run.workdir / "config.json", config_to_json(cfg))
        write_atomic(run.workdir / "config.txt", str(cfg))  # the resolved config, readable
        _write_metrics(metrics_file, [], keep_until=start)
        _write_metrics(run.workdir / "eval.jsonl", [], keep_until=start)
    fn = step_function(run)
    base_key = jax.random.key(cfg.train.seed)
    # Sharding report and the step compiled (and its memory checked) before the first batch.
    biggest = abstract_batch(run.shape, run.preprocessor.pad_id, lambda n: NamedSharding(run.mesh, batch_spec(n)),
                             run.sides)  # fmt: skip
    first_key = jax.random.fold_in(base_key, start)  # before the mark: the next window is the step's alone
    batches = BatchesAhead(run, range(start, cfg.train.steps))
    first = None
    if device_memory_limit(cfg.train.get("device_memory_gb"))[0] is None and start < cfg.train.steps:
        # No limit to check the largest program against (CPU without train.device_memory_gb): compile
        # the program step one runs instead, not a largest one that the data may never need (with
        # shape buckets, text-only data: a second program, minutes at full depth, issue 28).
        first = batches.get(start)
        biggest = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), first[0])
    # The optimizer's own schedule, for the logs: evaluated for every step at once, here, so that
    # no small program compiles inside the loop.
    t = cfg.train
    logged_lr = np.asarray(lr_schedule(t.learning_rate, t.steps, t.warmup_steps)(np.arange(t.steps)), np.float64)
    clock.mark("setup_s")
    fn = before_first_step(run, fn, biggest, run.consts, first_key, lead=lead)
    clock.mark("first_compile_s")
    preempted = _Preempted()
    bar = tqdm(total=cfg.train.steps, initial=start, desc="training", unit="step", disable=not (progress and lead),
               dynamic_ncols=True)  # fmt: skip
    last = {}
    started, pairs_done = time.perf_counter(), 0
    bad = BadSteps(cfg.train.get("max_bad_steps", 0), total=run.bad_steps, log=bar.write)
    try:
        for step in range(start, cfg.train.steps):
            batch, subset, skipped_rows = first if step == start and first is not None else batches.get(step)
            record_skipped(skipped, [dict(step=step + 1, **r) for r in skipped_rows])
            run.params, run.opt_state, metrics = fn(run.params, run.rest, run.opt_state, batch, run.consts,
                                                    jax.random.fold_in(base_key, step), run.schedule)  # fmt: skip
            pairs_done += int(run.shape.pairs)
            done = step + 1
            bad.observe(done, metrics)
            if (
                done == cfg.train.steps
                or done % cfg.train.log_every == 0
                or done % cfg.train.checkpoint_every == 0
            ):
                bad.flush()  # metrics and checkpoints (which keep bad_steps) see every step counted
            stop = bad.tripped
            run.bad_steps = bad.total
            if done % cfg.train.log_every == 0 or done == cfg.train.steps or stop:
                last = {
                    "step": done,
                    "subset": subset,
                    "lr": float(logged_lr[step]),
                    **{k: _finite_or_none(v) for k, v in metrics.items() if k != "finite"},
                }
                last["masked"] = int(metrics["masked"])
                last["bad_steps"] = bad.total
                clock.interval(done)  # the device has finished step ``done``: its values were read
                if lead:
                    _write_metrics(metrics_file, [last])
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=last["loss"], acc=last["accuracy"], bad_steps=bad.total,
                                pairs_s=f"{pairs_done / max(elapsed, 1e-9):.1f}")  # fmt: skip
            bar.update()
            if stop:
                save_checkpoint(run, manager, done, wait=True)
                raise TrainingStopped(bad.message(done, run.workdir))
            if cfg.eval.every and cfg.eval.root and (done % cfg.eval.every == 0 or done == cfg.train.steps):
                record = evaluate_now(run, done)
                bar.write(f"step {done}: eval overall {100 * record['overall']:.1f}")
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps or preempted.flag:
                save_checkpoint(run, manager, done, wait=preempted.flag or done == cfg.train.steps)
            if preempted.flag:
                print(f"SIGTERM: saved a checkpoint at step {done}; stopping", flush=True)
                break
    except Exception as e:  # a collective failed: say which process died (multi-process runs)
        wait_for_lost_process(e)
        raise
    finally:
        batches.close()
        bar.close()
        manager.wait_until_finished()
        manager.close()
        preempted.restore()
        clock.close()
    if lead:
        timing = clock.summary()
        write_atomic(run.workdir / "timing.json", json.dumps(timing, indent=1) + "\n")
        how = "compiled" if timing["first_compile_programs"] else "read from the compilation cache"
        print(f"timing: set-up {timing['setup_s']} s, step {how} in {timing['first_compile_s']} s, "
              f"steady state {timing['step_s']} s/step over {timing['steps']} steps, "
              f"{timing['compiles_in_loop']} more programs compiled in the loop ({timing['compile_s_in_loop']} s)",
              flush=True)  # fmt: skip
    if lead and metrics_file.exists():
        plots.loss_curve(metrics_file, run.workdir / "loss.png")
    return last


def _finite_or_none(value):
    """A metric for metrics.jsonl: rounded, or null when not finite (strict JSON has no NaN)."""
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


