"""Both sides of ``g2e-jax compare`` encoding the same parts, timed: the official PyTorch pipeline
(live mode) and g2e_jax, each reported with its dtype, device and rows/s.
"""

from __future__ import annotations

import platform
import statistics
import time

from g2e_jax.compare.parts import Part


def timed(encode_all, repeats: int) -> dict:
    """First pass (its results kept) and, with repeats, the median of further passes."""
    started = time.perf_counter()
    rows = encode_all()
    first = time.perf_counter() - started
    again = []
    for _ in range(repeats):
        started = time.perf_counter()
        encode_all()
        again.append(time.perf_counter() - started)
    seconds = statistics.median(again) if again else first
    return {
        "first_pass_seconds": round(first, 3),
        "first_pass_rows_per_s": rows / first if first else None,
        "seconds": round(seconds, 3),
        "rows_per_s": rows / seconds if seconds else None,
        "timed_passes": len(again) or 1,
    }


def encode_reference(cfg, parts: list[Part], progress: bool) -> dict:
    """Each part's ``official`` embeddings from the PyTorch pipeline; returns that side's report."""
    from g2e_jax.compare.reference import OfficialPrompt, TorchReference, official_prompt
    from g2e_jax.models.dtypes import resolve_dtype

    dtype = resolve_dtype(cfg.model.dtype) if cfg.reference.dtype == "auto" else cfg.reference.dtype
    prompt = official_prompt(
        cfg.prompt.preset, cfg.prompt.scheme, cfg.prompt.query_system, cfg.prompt.document_system
    )
    if cfg.model.path is None:
        raise ValueError("no model: set --config.model.path=/path/to/hf_model_dir")
    ref = TorchReference(
        cfg.model.path,
        prompt=prompt,
        dtype=dtype,
        device=cfg.reference.device,
        adapter=cfg.model.adapter,
        max_len=cfg.max_len,
        image_resolution=cfg.image_resolution,
        batch_size=cfg.batch_size,
    )

    def encode_all():
        for part in parts:
            query = OfficialPrompt.uses_query_template(part.role, part.subset)
            part.official = ref.encode(
                part.texts, part.images, query_template=query, progress=progress, desc=f"PyTorch {part.name}"
            )
        return sum(len(p.ids) for p in parts)

    timing = timed(encode_all, cfg.timing_repeats)
    device = ref.device
    if device.startswith("cuda"):
        device = f"{device} ({ref.torch.cuda.get_device_name()})"
    else:
        device = f"cpu ({ref.torch.get_num_threads()} threads, {platform.machine()})"
    return {"dtype": dtype, "device": device, "framework": f"torch {ref.torch.__version__}", **timing}


def encode_g2e(cfg, parts: list[Part], progress: bool) -> dict:
    """Each part's ``ours`` embeddings from g2e_jax's ``Embedder``; returns that side's report."""
    import contextlib

    import jax

    from g2e_jax.embed import Embedder

    embedder = Embedder.from_config(cfg)

    def encode_all():
        for part in parts:
            part.ours = embedder.encode(
                part.texts, part.images, role=part.role, subset=part.subset, progress=progress
            )
        return sum(len(p.ids) for p in parts)

    precision = cfg.matmul_precision
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        timing = timed(encode_all, cfg.timing_repeats)
    dev = jax.devices()[0]
    device = f"{dev.platform} ({dev.device_kind}) x{jax.device_count()}"
    info = {
        "dtype": embedder.dtype,
        "device": device,
        "framework": f"jax {jax.__version__}",
        "matmul_precision": precision or "default",
        **timing,
    }
    return info
