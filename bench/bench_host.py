"""Host preprocessing and end-to-end encoding throughput (the streaming pipeline), vs PyTorch.

    python bench/bench_host.py                 # 448 x 448 image rows from JPEG files, tiny model
    python bench/bench_host.py --rows 64 --quick

1. Host preprocessing: image rows/s through ``g2e_jax.pipeline.RowStream`` (decode, resize,
   normalise, patchify, tokenise, shape sort) with 1 worker thread, with the default pool (one per
   core), and with a pool of as many worker *processes* doing the image work (the alternative the
   pipeline does not take: each row's float32 patches travel back pickled).
2. End to end, host included: ``Embedder.encode`` on the file paths (images read, prepared and
   encoded while streaming) against the PyTorch reference pipeline on the same files (PIL decode,
   the Hugging Face processor, transformers' Qwen2-VL base model with sdpa, last-token pooling),
   batches of ``--batch-size``; one warm-up call each, then the median of ``--repeats``.

Images are 448 x 448 (1024 patches, 256 image tokens: the processor's bounds are rewritten to
Qwen2-VL's own, as in bench_encode.py). ``bg cores``: the cores other processes kept busy meanwhile
(on a shared machine read that column first). No GPU is needed or used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # hf_reference

from common import CpuMeter  # noqa: E402

QWEN2_VL_MIN_PIXELS, QWEN2_VL_MAX_PIXELS = 56 * 56, 28 * 28 * 1280


def _write_inputs(work: Path, n_files: int, size: int):
    from PIL import Image

    from g2e_jax.models.qwen2_vl.hf_files import write_processor_files
    from g2e_jax.models.qwen2_vl.tiny import make_tiny, tiny_config

    cfg = tiny_config()
    model = make_tiny(work / "tiny", seed=0, config=cfg)
    write_processor_files(model, min_pixels=QWEN2_VL_MIN_PIXELS, max_pixels=QWEN2_VL_MAX_PIXELS,
                          patch_size=cfg.vision.patch_size, temporal_patch_size=cfg.vision.temporal_patch_size,
                          merge_size=cfg.vision.spatial_merge_size)  # fmt: skip
    rng = np.random.default_rng(0)
    files = []
    for i in range(n_files):  # smooth images with noise: JPEG sizes like photographs, not like noise
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size, size), Image.BILINEAR)
        arr = np.clip(np.asarray(img, np.int16) + rng.integers(-12, 12, (size, size, 3)), 0, 255).astype(
            np.uint8
        )
        files.append(work / f"img{i:03d}.jpg")
        Image.fromarray(arr).save(files[-1], quality=90)
    return model, [str(f) for f in files]


def _image_work(args):
    path, cfg = args
    from g2e_jax.models.qwen2_vl.images import preprocess

    return preprocess(path, cfg, source="image")


def host_throughput(pre, texts, images, workers: int | None, processes: bool, batch: int) -> float:
    from g2e_jax.pipeline import RowStream

    started = time.perf_counter()
    if processes:  # the image work in worker processes (patches pickled back), then the same rows
        with ProcessPoolExecutor(workers) as pool:
            feats = list(pool.map(_image_work, [(p, pre.image_config) for p in images], chunksize=4))
        system_len = len(pre.system_ids("query"))
        for i, f in enumerate(feats):
            pre._prepare_row(i, texts[i], images[i], "query", None, system_len, f)
    else:
        texts_, images_, inst = pre.columns(texts, images)
        for _ in RowStream(pre, texts_, images_, inst, range(len(texts)), role="query", batch_size=batch,
                           workers=workers):  # fmt: skip
            pass
    return len(texts) / (time.perf_counter() - started)


def torch_encode(model, processor, texts, images, batch: int) -> np.ndarray:
    import torch
    from hf_reference import official_template
    from PIL import Image

    from g2e_jax.prompts import PAPER_SYSTEM

    outs = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch):
            pil = [Image.open(p).convert("RGB") for p in images[s : s + batch]]
            strings = [official_template(t, has_image=True, role="query", system=PAPER_SYSTEM, scheme="gen2embed")
                       for t in texts[s : s + batch]]  # fmt: skip
            enc = processor(text=strings, images=pil, padding=True, return_tensors="pt")
            mask = enc["attention_mask"]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1).contiguous()
            hidden = model.model(input_ids=enc["input_ids"], attention_mask=mask, pixel_values=enc["pixel_values"],
                                 image_grid_thw=enc["image_grid_thw"], mm_token_type_ids=enc["mm_token_type_ids"],
                                 position_ids=positions).last_hidden_state  # fmt: skip
            pooled = hidden[torch.arange(hidden.shape[0]), mask.sum(-1) - 1]
            outs.append(torch.nn.functional.normalize(pooled.float(), dim=-1).numpy())
    return np.concatenate(outs)


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(median seconds, background cores, last result) after one warm-up call."""
    out = fn()
    times, bg = [], []
    for _ in range(repeats):
        with CpuMeter() as meter:
            started = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - started)
        bg.append(meter.background_cores or 0.0)
    return statistics.median(times), statistics.median(bg), out


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=64, help="image rows (448 x 448 JPEG files, reused)")
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="host throughput only (no encode, no PyTorch)")
    parser.add_argument("--out", help="JSON file (default: bench/results/host.json)")
    args = parser.parse_args()

    import jax
    import torch

    from g2e_jax import Embedder
    from g2e_jax.pipeline import default_workers

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="g2e_bench_host_"))
    model_dir, files = _write_inputs(work, args.files, args.size)
    texts = [f"<|image_1|> What is shown in picture {i}?" for i in range(args.rows)]
    images = [files[i % len(files)] for i in range(args.rows)]
    emb = Embedder.from_pretrained(model_dir, dtype="float32", batch_size=args.batch_size, max_len=1024,
                                   progress=False)  # fmt: skip
    pool = default_workers()
    results = {"rows": args.rows, "image_size": args.size, "default_workers": pool, "cpu_count": os.cpu_count(),
               "device": str(jax.devices()[0]), "host_rows_per_s": {}}  # fmt: skip
    for label, workers, processes in (("1 thread", 1, False), (f"{pool} threads (default)", pool, False),
                                      (f"{pool} processes", pool, True)):  # fmt: skip
        with CpuMeter() as meter:
            rate = max(host_throughput(emb.preprocessor, texts, images, workers, processes, args.batch_size)
                       for _ in range(args.repeats))  # fmt: skip
        results["host_rows_per_s"][label] = round(rate, 2)
        print(
            f"host preprocessing, {label:>22}: {rate:7.2f} image rows/s (bg cores {meter.background_cores or 0:.2f})"
        )
    if not args.quick:
        from transformers import Qwen2VLForConditionalGeneration

        from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor

        hf = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa",
                                                             local_files_only=True).eval()  # fmt: skip
        processor = load_hf_processor(model_dir)
        j_s, j_bg, j_out = timed(
            lambda: emb.encode(texts, images, role="query", progress=False), args.repeats
        )
        t_s, t_bg, t_out = timed(
            lambda: torch_encode(hf, processor, texts, images, args.batch_size), args.repeats
        )
        cosine = float((j_out * t_out).sum(-1).min())
        results["end_to_end"] = {"g2e_jax_rows_per_s": round(args.rows / j_s, 2),
                                 "pytorch_rows_per_s": round(args.rows / t_s, 2), "ratio": round(t_s / j_s, 3),
                                 "min_cosine": cosine, "bg_cores": [round(j_bg, 2), round(t_bg, 2)]}  # fmt: skip
        print(f"end to end (host included), tiny model, {args.rows} image+text queries: g2e_jax "
              f"{args.rows / j_s:.2f} rows/s, PyTorch {args.rows / t_s:.2f} rows/s -> {t_s / j_s:.2f}x "
              f"(min cosine {cosine:.7f}; bg cores {j_bg:.2f} / {t_bg:.2f})")  # fmt: skip
        if cosine < 0.99999:
            raise SystemExit("embeddings disagree with the reference")
    out = Path(args.out or Path(__file__).parent / "results" / "host.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
