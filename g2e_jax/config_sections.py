"""The config sections that several commands share (model, prompt, data, mesh, distributed), each
built in one place so that a flag such as ``--config.data.groups_file`` means the same in each.

The commands' own defaults (``eval_config``, ``embed_config``, ``training_config`` ...) compose
these with what is theirs; a command names the shared fields it takes, never redefines one.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def model_section(
    *, dtype: str | None = "auto", adapter: bool = True, compute_dtype: bool = False,
    shard_weights: bool = False,
) -> ml_collections.ConfigDict:  # fmt: skip
    """``model.path``: a local Hugging Face directory (the embedding jobs also take a ``g2e-jax train``
    workdir; required). ``model.dtype`` (omitted where ``dtype`` is None, for commands that load no
    weights): "auto" is bfloat16 on GPU/TPU and float32 on CPU, or name one. ``model.adapter``, where
    the command takes one: a PEFT LoRA/DoRA folder merged onto ``model.path``. Training's
    ``model.compute_dtype``: the matmuls' dtype ("auto": bfloat16 on GPU/TPU). ``model.shard_weights``,
    where the command encodes on several devices: the weights sharded over every device (fsdp), not
    replicated."""
    m = ml_collections.ConfigDict()
    m.path = config_dict.placeholder(str)
    if dtype is not None:
        m.dtype = dtype
    if adapter:
        m.adapter = config_dict.placeholder(str)
    if compute_dtype:
        m.compute_dtype = config_dict.FieldReference("auto", field_type=str)
    if shard_weights:
        m.shard_weights = False
    return m


def prompt_section(
    preset: str = "hierarchical", *, systems: bool = True, scheme: str = "gen2embed"
) -> ml_collections.ConfigDict:
    """``prompt.preset`` (a preset of ``g2e_jax.prompts.PRESETS``: "hierarchical", "plain",
    "qwen3_vl_embedding", ...), ``prompt.scheme`` ("gen2embed", or "mrope" for Qwen's own M-RoPE
    positions, which the qwen3_vl_embedding preset requires) and, where the command renders whole
    templates, ``prompt.query_system`` / ``prompt.document_system`` (None: the preset's system prompts;
    in the qwen3_vl_embedding format, each role's default instruction)."""
    p = ml_collections.ConfigDict()
    p.preset = preset
    p.scheme = scheme
    if systems:
        p.query_system = config_dict.placeholder(str)
        p.document_system = config_dict.placeholder(str)
    return p


def prompt_fields(section) -> dict:
    """A ``prompt`` section as the mapping ``g2e_jax.prompts.get_prompt`` reads: the preset, the
    scheme and the system prompts that are set."""
    fields = {"preset": section.preset, "scheme": section.scheme}
    systems = {k: section.get(k) for k in ("query_system", "document_system")}
    fields.update({k: v for k, v in systems.items() if v is not None})
    return fields


# Every field a ``data`` section may hold, with its default: a command names those it reads.
DATA_FIELDS = {
    # clusters (the `g2e-jax mine` output) | mmeb (plain rows) | prepared (TFDS)
    "source": lambda: "clusters",
    "clusters_dir": lambda: config_dict.placeholder(str),  # `g2e-jax mine` output
    "prepared_dir": lambda: config_dict.placeholder(str),  # `g2e-jax prepare` output
    "root": lambda: config_dict.placeholder(str),  # an MMEB-format folder: one sub-folder per subset
    "dir": lambda: config_dict.placeholder(str),  # SugarCrepe(++): the folder with <subset>.json
    "image_dir": lambda: config_dict.placeholder(str),  # image paths in the rows are relative to it
    "split": lambda: "original",  # MMEB-train rows: original | diverse_instruction
    "subsets": lambda: (),  # names under root; (): the command's default set
    "groups_file": lambda: config_dict.placeholder(str),  # JSON {subset: {category, split}}; None: MMEB's
    # Plain rows (mmeb, prepared) per subset at most, as the official in-batch training samples them
    # (g2e_jax.data.mmeb.sample_rows); None: all. Mined clusters are never capped.
    "num_sample_per_subset": lambda: config_dict.placeholder(int),
    "bad_rows": lambda: "error",  # a row unusable mid-run: error (stop, naming it) | skip (skipped.jsonl)
    "check": lambda: True,  # check every row and image before the run (g2e-jax check-data; cached)
    "check_workers": lambda: 0,  # threads opening images (0: one per CPU)
    "check_cache": lambda: config_dict.placeholder(str),  # the check's cache file (default: ~/.cache/g2e_jax)
}


def data_section(
    *fields: str, into: ml_collections.ConfigDict | None = None, **defaults
) -> ml_collections.ConfigDict:
    """A ``data`` section of ``fields`` (names of ``DATA_FIELDS``, in this order), with the command's
    own defaults where given; ``into`` adds them to an existing section instead."""
    unknown = sorted(set(fields) - set(DATA_FIELDS)) + sorted(set(defaults) - set(fields))
    if unknown:
        raise ValueError(f"unknown data field(s) {unknown}; known: {sorted(DATA_FIELDS)}")
    d = ml_collections.ConfigDict() if into is None else into
    for name in fields:
        d[name] = defaults[name] if name in defaults else DATA_FIELDS[name]()
    return d


def mesh_section() -> ml_collections.ConfigDict:
    """The device mesh (``g2e_jax.mesh.make_mesh``): sizes of the data, fsdp and tensor axes within a
    slice (-1: the rest) and of the data / fsdp axes across slices (DCN)."""
    m = ml_collections.ConfigDict()
    m.data = -1
    m.fsdp = 1
    m.tensor = 1
    m.dcn_data = 1
    m.dcn_fsdp = 1
    return m


def distributed_section() -> ml_collections.ConfigDict:
    """Multi-process start-up, read by ``g2e_jax.distributed.init_distributed``."""
    d = ml_collections.ConfigDict()
    d.coordinator = config_dict.placeholder(
        str
    )  # "host:port"; None: auto-detect (TPU, SLURM) or single process
    d.num_processes = config_dict.placeholder(int)
    d.process_id = config_dict.placeholder(int)
    # A process silent for this long is lost: every other process exits naming it (``Watchdog``), so a
    # pod never hangs on a lost host. JAX's own heartbeat timeout is 4x this (the backstop).
    d.heartbeat_timeout_s = 100
    d.initialization_timeout_s = 300  # how long processes wait for each other at start
    return d
