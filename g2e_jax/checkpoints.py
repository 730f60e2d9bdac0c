"""The training workdir's checkpoint format, written and read in one place.

Layout: ``workdir/config.json`` (the resolved training config) and ``workdir/checkpoints/<step>/``,
an Orbax checkpoint of three items: ``params`` (the trainable parameters as a pure dict),
``opt_state`` (the optimizer state) and ``meta`` (JSON: step, seed, config, bad_steps). ``g2e-jax
train`` writes and resumes it; ``Embedder.from_pretrained(workdir)`` and ``export-hf`` read it as a
model (base weights + a checkpoint's trainable parameters), which needs Orbax and ``config.json``,
nothing of the trainer.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import jax
import ml_collections
from flax import nnx

from g2e_jax.adapters.lora import AdapterConfig, apply_adapters, merge_adapters, trainable_filter
from g2e_jax.io import weights_fingerprint
from g2e_jax.models import load
from g2e_jax.paths import resolve_from

CHECKPOINTS = "checkpoints"


def _abstract(tree):
    """Restore targets with this process's shardings: without them Orbax restores onto the saver's
    devices, and a checkpoint written on 8 devices does not load on 1 ("topology mismatch")."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def open_manager(workdir: str | Path, *, keep: int | None = None, async_save: bool = False):
    """The Orbax manager of ``workdir/checkpoints`` for a run (created if absent), keeping the newest
    ``keep`` checkpoints (None: all)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager((Path(workdir) / CHECKPOINTS).absolute(), options=options)


def save(manager, step: int, *, params, opt_state, meta: dict, wait: bool = False) -> None:
    """Writes checkpoint ``step``: ``params`` an nnx State of the trainable parameters."""
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta),
    ))  # fmt: skip
    if wait:
        manager.wait_until_finished()


def restore_training(manager, *, params, opt_state):
    """(step, opt_state, meta) of the newest readable checkpoint, its parameters written into
    ``params`` (an nnx State, on the current mesh whatever mesh saved it); (0, None, None) when
    there is none. Unreadable checkpoints are deleted, so that the resumed run can save them again."""
    import orbax.checkpoint as ocp

    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(params))),
        opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
        meta=ocp.args.JsonRestore(),
    )
    step, restored = restore_newest(manager, args, delete_unreadable=True)
    if restored is None:
        return 0, None, None
    nnx.replace_by_pure_dict(params, restored["params"])
    return int(restored["meta"]["step"]), restored["opt_state"], restored["meta"]

def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CHECKPOINTS).is_dir() and (path / "config.json").is_file()


def restore_newest(manager, args, *, delete_unreadable: bool = False):
    """(step, restored items) of the newest checkpoint that reads back, or (0, None). Unreadable
    (corrupted, partial) ones are skipped with a warning, and deleted if asked so that a resumed
    run can save that step again."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return step, manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
            warnings.warn(
                f"checkpoint at step {step} is unreadable ({type(e).__name__}: {e}); trying an older one",
                stacklevel=2,
            )
            if delete_unreadable:
                manager.delete(step)
    return 0, None


def apply_run_adapters(model, cfg, *, rngs: nnx.Rngs) -> AdapterConfig:
    """The adapters of a training config on ``model``: ``adapter.init_from`` (a PEFT folder) decides
    their kind, rank, alpha and targets when set, ``adapter.*`` otherwise; the dropout is always
    ``adapter.dropout`` (a training setting). Returns the adapter config in effect."""
    from g2e_jax.adapters.peft import load_peft_adapter

    settings = cfg.adapter.to_dict()
    init_from = settings.pop("init_from", None)
    if init_from is None:
        adapter = AdapterConfig(**settings)
        apply_adapters(model, adapter, rngs=rngs)
        return adapter
    return load_peft_adapter(model, init_from, dropout=settings["dropout"], rngs=rngs)


def load_trained(
    workdir: str | Path, *, step: int | None = None, dtype: str | None = None, merge: bool = True
):
    """(model, base model dir, weights id) of a ``g2e-jax train`` workdir (latest step by default);
    adapters merged into the kernels unless ``merge=False`` (then they stay ``LoraLinear`` layers)."""
    import orbax.checkpoint as ocp

    workdir = Path(workdir)
    if not is_run_dir(workdir):
        raise FileNotFoundError(f"{workdir}: not a training workdir (needs config.json and checkpoints/)")
    cfg = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    base = Path(resolve_from(workdir / "config.json", cfg.model.path))
    model = load(base, dtype=dtype or cfg.model.dtype, progress=False)
    adapter = apply_run_adapters(model, cfg, rngs=nnx.Rngs(params=0, dropout=1))
    trainable = nnx.state(model, trainable_filter(adapter))
    args = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(trainable))))
    with ocp.CheckpointManager((workdir / CHECKPOINTS).absolute()) as manager:
        steps = sorted(manager.all_steps())
        if step is None:
            step, restored = restore_newest(manager, args)
            if restored is None:
                raise FileNotFoundError(f"{workdir}: no readable checkpoint")
        elif step not in steps:
            raise ValueError(f"{workdir}: no checkpoint at step {step}; have {steps}")
        else:
            restored = manager.restore(step, args=args)
    nnx.replace_by_pure_dict(trainable, restored["params"])
    nnx.update(model, trainable)
    if merge:
        merge_adapters(model)
    weights_id = hashlib.sha256(
        f"{weights_fingerprint(base)}:{workdir.resolve()}:{step}".encode()
    ).hexdigest()
    return model, base, weights_id
