"""A trained run -> a merged model: in memory (``load_trained``) or in HF layout (``export_hf``)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jax
import ml_collections
from flax import nnx

from g2e_jax.io import weights_fingerprint
from g2e_jax.models import load, save
from g2e_jax.paths import resolve_from
from g2e_jax.train.lora import AdapterConfig, apply_adapters, merge_adapters, trainable_filter

# The non-weight files of a HF model directory that an export carries over.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "generation_config.json")  # fmt: skip


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "checkpoints").is_dir() and (path / "config.json").is_file()


def load_trained(workdir: str | Path, *, step: int | None = None, dtype: str | None = None):
    """(merged model, base model dir, weights id) of a ``g2e-jax train`` workdir (latest step by default)."""
    import orbax.checkpoint as ocp

    workdir = Path(workdir)
    if not is_run_dir(workdir):
        raise FileNotFoundError(f"{workdir}: not a training workdir (needs config.json and checkpoints/)")
    cfg = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    base = Path(resolve_from(workdir / "config.json", cfg.model.path))
    model = load(base, dtype=dtype or cfg.model.dtype, progress=False)
    adapter = AdapterConfig(**cfg.adapter.to_dict())
    apply_adapters(model, adapter, rngs=nnx.Rngs(params=0, dropout=1))
    trainable = nnx.state(model, trainable_filter(adapter))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(trainable))
    from g2e_jax.train.trainer import restore_newest

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
    merge_adapters(model)
    weights_id = hashlib.sha256(
        f"{weights_fingerprint(base)}:{workdir.resolve()}:{step}".encode()
    ).hexdigest()
    return model, base, weights_id


def export_hf(workdir: str | Path, output: str | Path, *, step: int | None = None) -> Path:
    """Adapters merged, saved in HF layout with the base model's tokenizer and processor files."""
    model, base, _ = load_trained(workdir, step=step)
    output = Path(output)
    save(model, output, progress=False)
    for name in PROCESSOR_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, output / name)
    return output
