"""The training workdir's checkpoint format, written and read in one place.

Layout: ``workdir/config.json`` (the resolved training config) and ``workdir/checkpoints/<step>/``,
an Orbax checkpoint of three items: ``params`` (the trainable parameters as a pure dict),
``opt_state`` (the optimizer state) and ``meta`` (JSON: step, seed, config, bad_steps). ``g2e-jax
train`` writes and resumes it; ``Embedder.from_pretrained(workdir)`` and ``export-hf`` read it as a
model (base weights + a checkpoint's trainable parameters), which needs Orbax and ``config.json``,
nothing of the trainer.

Layouts. New checkpoints are written in the stacked layout: a stack of layers (``stack_layers``) is one
module whose parameters carry a leading layer axis, so ``params`` holds ``text.layers.attn.q_proj.lora_a``
of shape ``[L, ...]``, and the optimizer state's moments mirror it. Layout v1 (per-layer) checkpoints,
written before the layers were stacked, name every layer by index (``text.layers.0.attn.q_proj.lora_a``,
shapes without the layer axis, in ``params`` and in the optimizer state alike); they are converted on
restore: recognised from the checkpoint's own tree (the per-layer names of the current model's stacked
parameters, ``find_stacks`` + ``unstacked_path``), read per layer, stacked in layer order and placed with
the current shardings. Resuming, ``Embedder.from_pretrained(workdir)`` and ``export-hf`` all go through
that; a resumed v1 run then writes stacked checkpoints. The checkpoint itself is never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from g2e_jax.adapters.lora import AdapterConfig, apply_adapters, find_stacks, merge_adapters, trainable_filter
from g2e_jax.io import weights_fingerprint
from g2e_jax.models import load
from g2e_jax.models.name_map import unstacked_path
from g2e_jax.paths import resolve_from

CHECKPOINTS = "checkpoints"


def _abstract(tree):
    """Restore targets with this process's shardings: without them Orbax restores onto the saver's
    devices, and a checkpoint written on 8 devices does not load on 1 ("topology mismatch")."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _handlers() -> dict:
    """The items' handlers, named so that ``item_metadata`` reads a checkpoint's trees before restoring."""
    import orbax.checkpoint as ocp

    return {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()}  # fmt: skip


def open_manager(
    workdir: str | Path, *, keep: int | None = None, async_save: bool = False, create: bool = True
):
    """The Orbax manager of ``workdir/checkpoints`` for a run (created if absent), keeping the newest
    ``keep`` checkpoints (None: all)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=async_save
    )
    return ocp.CheckpointManager(
        (Path(workdir) / CHECKPOINTS).absolute(), options=options, item_handlers=_handlers()
    )


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


class CheckpointLayoutError(ValueError):
    """A per-layer (v1) checkpoint that does not fit the current model (other layers or parameters).
    Not an unreadable checkpoint: it is reported, never deleted."""


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    raise TypeError(f"unexpected pytree key {key!r}")


def _dotted(path) -> str:
    return ".".join(_key_name(k) for k in path)


def _flat(tree) -> dict[str, object]:
    """A pytree's leaves by their dotted names (``1.0.mu.text.layers.attn.q_proj.lora_a.value``), the
    names Orbax gives them in a checkpoint; in the tree's leaf order."""
    return {_dotted(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _layer_names(name: str, stacks: Mapping[str, int]) -> list[str] | None:
    """The per-layer (v1) names of a stacked leaf ``name``, one per layer in layer order; None when the
    leaf is in no stack. A leaf of a params mirror (the optimizer's ``1.0.mu.<param path>.value``) has
    its parameter path after a prefix: the first split whose rest lies under a stack."""
    parts = name.split(".")
    for k in range(len(parts)):
        prefix, rest = ".".join(parts[:k]), ".".join(parts[k:])
        for stack, size in stacks.items():
            if rest.startswith(stack + "."):
                return [".".join(filter(None, (prefix, unstacked_path(rest, stack, i)))) for i in range(size)]
    return None


def _per_layer_plan(saved: Mapping[str, object], target: Mapping[str, object], stacks: Mapping[str, int]):
    """{target leaf: its per-layer names (None outside stacks)} when the checkpoint's tree ``saved`` (leaf
    names) is in the per-layer layout (v1) for the current tree ``target``; None when it is not (the
    stacked layout, or a tree that fits neither: the ordinary restore then reports it)."""
    plan = {name: _layer_names(name, stacks) for name in target}
    stacked = [name for name, layers in plan.items() if layers is not None]
    if not stacked or any(name in saved for name in stacked) or not any(plan[n][0] in saved for n in stacked):
        return None
    wanted = {layer if layers else name for name, layers in plan.items() for layer in (layers or [name])}
    missing, extra = sorted(wanted - set(saved)), sorted(set(saved) - wanted)
    if missing or extra:
        raise CheckpointLayoutError(
            "per-layer (v1) checkpoint does not fit the model: "
            + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"not in the model {extra[:5]}{' ...' if len(extra) > 5 else ''}" if extra else "")
        )
    return plan


def _layer_sharding(sharding):
    """One layer's sharding of a stacked parameter: its mesh axes without the (never sharded) layer axis."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec)
    if spec and spec[0] is not None:
        raise ValueError(f"stacked parameter sharded over its layer axis ({sharding.spec}); cannot convert")
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))


def _stack(layers, sharding):
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*layers)


def _restore_step(
    manager, step: int, targets: Mapping[str, object], stacks: Mapping[str, int], *, meta: bool
):
    """Items ``targets`` (current trees of arrays) of checkpoint ``step`` restored into the current
    layout and shardings (+ ``meta`` if asked): a per-layer (v1) item is read per layer and stacked."""
    import orbax.checkpoint as ocp

    saved = manager.item_metadata(step)
    args, plans = {}, {}
    for item, target in targets.items():
        flat = _flat(target)
        plan = _per_layer_plan(_flat(saved[item]) if saved[item] is not None else {}, flat, stacks)
        if plan is None:
            args[item] = ocp.args.StandardRestore(_abstract(target))
            continue
        # The checkpoint's own tree as the restore target, each leaf with the current sharding (per layer).
        shardings = {}
        for name, layers in plan.items():
            for layer in layers or [name]:
                shardings[layer] = _layer_sharding(flat[name].sharding) if layers else flat[name].sharding
        abstract = jax.tree_util.tree_map_with_path(
            lambda path, m, shardings=shardings: jax.ShapeDtypeStruct(
                m.shape, m.dtype, sharding=shardings[_dotted(path)]
            ),
            saved[item],
        )
        args[item], plans[item] = ocp.args.StandardRestore(abstract), plan
    if meta:
        args["meta"] = ocp.args.JsonRestore()
    restored = dict(manager.restore(step, args=ocp.args.Composite(**args)))
    for item, plan in plans.items():
        got = _flat(restored.pop(item))  # popped as they are stacked: the per-layer copies go one by one
        flat = _flat(targets[item])
        leaves = [
            _stack([got.pop(layer) for layer in plan[name]], flat[name].sharding)
            if plan[name]
            else got.pop(name)
            for name in flat
        ]
        restored[item] = jax.tree.unflatten(jax.tree.structure(targets[item]), leaves)
    return restored


def restore_training(manager, *, params, opt_state, stacks: Mapping[str, int]):
    """(step, opt_state, meta) of the newest readable checkpoint, its parameters written into
    ``params`` (an nnx State, on the current mesh whatever mesh saved it); (0, None, None) when
    there is none. ``stacks``: the model's stacks of layers (``find_stacks``), by which a per-layer
    (v1) checkpoint is recognised and stacked. Unreadable checkpoints are deleted, so that the resumed
    run can save them again (a v1 checkpoint that does not fit the model is an error, not deleted)."""
    targets = {"params": nnx.to_pure_dict(params), "opt_state": opt_state}
    _, restored = restore_newest(
        manager, lambda step: _restore_step(manager, step, targets, stacks, meta=True), delete_unreadable=True
    )
    if restored is None:
        return 0, None, None
    nnx.replace_by_pure_dict(params, restored["params"])
    return int(restored["meta"]["step"]), restored["opt_state"], restored["meta"]


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CHECKPOINTS).is_dir() and (path / "config.json").is_file()


def restore_newest(manager, restore: Callable[[int], object], *, delete_unreadable: bool = False):
    """(step, ``restore(step)``) of the newest checkpoint that reads back, or (0, None). Unreadable
    (corrupted, partial) ones are skipped with a warning, and deleted if asked so that a resumed
    run can save that step again. A ``CheckpointLayoutError`` (a v1 checkpoint that does not fit
    the model) is raised: the checkpoint is readable, the model is not the one that wrote it."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return step, restore(step)
        except CheckpointLayoutError:
            raise
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
    adapters merged into the kernels unless ``merge=False`` (then they stay ``LoraLinear`` layers).
    A per-layer (v1) checkpoint is stacked on restore (see the module's docstring)."""
    workdir = Path(workdir)
    if not is_run_dir(workdir):
        raise FileNotFoundError(f"{workdir}: not a training workdir (needs config.json and checkpoints/)")
    cfg = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    base = Path(resolve_from(workdir / "config.json", cfg.model.path))
    model = load(base, dtype=dtype or cfg.model.dtype, progress=False)
    adapter = apply_run_adapters(model, cfg, rngs=nnx.Rngs(params=0, dropout=1))
    trainable = nnx.state(model, trainable_filter(adapter))
    targets, stacks = {"params": nnx.to_pure_dict(trainable)}, find_stacks(model)
    with open_manager(workdir, create=False) as manager:
        steps = sorted(manager.all_steps())
        if step is None:
            step, restored = restore_newest(
                manager, lambda s: _restore_step(manager, s, targets, stacks, meta=False)
            )
            if restored is None:
                raise FileNotFoundError(f"{workdir}: no readable checkpoint")
        elif step not in steps:
            raise ValueError(f"{workdir}: no checkpoint at step {step}; have {steps}")
        else:
            restored = _restore_step(manager, step, targets, stacks, meta=False)
    nnx.replace_by_pure_dict(trainable, restored["params"])
    nnx.update(model, trainable)
    if merge:
        merge_adapters(model)
    weights_id = hashlib.sha256(
        f"{weights_fingerprint(base)}:{workdir.resolve()}:{step}".encode()
    ).hexdigest()
    return model, base, weights_id
