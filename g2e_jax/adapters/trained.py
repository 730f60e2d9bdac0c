"""A ``g2e-jax train`` workdir as a model: base weights + the trained parameters of a checkpoint.

Used by the Embedder (``from_pretrained(workdir)``), ``export-hf`` and the trainer's resume
(``restore_newest``); it needs Orbax and the workdir's ``config.json``, nothing of the trainer.
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


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "checkpoints").is_dir() and (path / "config.json").is_file()


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
    # The target carries this process's shardings: without one Orbax restores onto the saver's devices
    # and a checkpoint written on 8 devices does not load on 1 ("topology mismatch").
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), nnx.to_pure_dict(trainable)
    )
    args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
    with ocp.CheckpointManager((workdir / "checkpoints").absolute()) as manager:
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
