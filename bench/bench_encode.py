"""Embedding throughput: g2e_jax's ``Embedder`` vs the PyTorch reference pipeline, same weights, same rows.

    python bench/bench_encode.py                            # tiny + 2B widths (2 + 2 layers)
    python bench/bench_encode.py --quick                    # tiny model, few rows (smoke test)
    PYTHONPATH=. python bench/bench_encode.py --device gpu  # bfloat16, PyTorch sdpa on CUDA, MFU

Models: both frameworks load one Hugging Face directory written by ``make_tiny`` (random weights):
``tiny`` and ``2b`` (Qwen2-VL-2B's widths at a reduced depth: ``--layers`` decoder layers and
``--vision-blocks`` vision blocks, 2 and 2 by default; the table names the depth). The image
processor's pixel bounds are rewritten to Qwen2-VL's own defaults (56*56 .. 28*28*1280) so that a
448x448 image stays 448x448: 1024 patches, 256 image tokens, as in the paper's training setup.

Workloads (seeded, nothing downloaded; lengths counted with the model's tokenizer):
  docs   short documents, role "document": class-label-like strings (~5 tokens of content)
  text   text queries, role "query": an instruction and a sentence (~40 tokens of content)
  image  image+text queries, role "query": a 448x448 RGB image and a short question
  mixed  the same with images of mixed native sizes (MIXED_SIZES), pre-resized with the official
         `random` mode, as the paper's eval and mining run: 576 to 3,780 patches an image
For the image workloads the table also gives the patch slots per real patch of g2e_jax's batches:
the vision stream's (norms and MLPs pay for every slot), with the rows sorted by size as the Embedder
sorts them and, for comparison, in input order; and the key slots (each image's queries meet the
keys of the batch's largest image, bucketed).

--memory (separately): the eight photographs of issue 33 (PHOTO_SIZES) encoded once on each side,
each side in a fresh process: peak resident memory (ru_maxrss, model included), seconds (g2e_jax's
include its compilation) and the cosine between the two.
Every row is rendered in the hierarchical prompt (the paper's system level, the row, the query
suffix) with the ``--scheme`` placeholder/position scheme (gen2embed by default) on both sides.

g2e_jax: rows are prepared once (``Preprocessor.prepare``: tokenisation, image patches) outside the
timed region; timed is ``Embedder.encode_prepared`` (sorting into shape buckets, collation,
host->device, the jitted program, results to numpy). It runs without the prefix cache and, when
the ``Embedder`` has a ``prefix_cache`` argument, with it: the system segment's keys and values are
computed once per (weights, prompt, role), during the warm-up call, and reused by every batch.

Reference: the official pipeline. Full template strings (tests/hf_reference.official_template) ->
the Hugging Face processor (right padding, batches of ``--batch-size`` rows in input order) and the
positions (sequential for gen2embed, ``get_rope_index`` for mrope), all built once outside the
timed region. Timed: inputs to the device, the base model ``model.model(...)`` of transformers'
``Qwen2VLForConditionalGeneration`` (sdpa attention, eval mode, ``torch.inference_mode()``), the
last real token, L2 normalisation, ``.cpu().numpy()``. This is conservative: the official code runs
the whole CausalLM, which also computes vocabulary logits for every token, and computes positions
inside the model; both would make the reference slower.

Row counts should be multiples of ``--batch-size``: g2e_jax runs every batch at full size (fixed
shapes; its user segments are padded to shape buckets, see ``g2e_jax.preprocess.bucket``), the reference pads each batch to
its own longest row and runs the last one short.

--end-to-end: the timed region starts from the raw rows on both sides, as a user calls it: g2e_jax's
``Embedder.encode(texts, images)`` (tokenisation, image resize and patches on its worker threads,
then the above) against the reference's processor calls, positions and model, batch by batch.

Timing: one warm-up call per side (compilation, prefix K/V) is excluded, then ``--repeats`` timed
calls; the sides run in turn within each repeat so that a varying background load hits them
alike, and the cores other processes kept busy meanwhile are measured (``bg cores``: on a shared
machine read that column first). Reported: rows / median seconds. Parity: each g2e_jax variant's
embeddings against the reference's (min cosine over the rows); in float32 anything below 0.99999
is an error (non-zero exit).

FLOPs (analytic, from the config and the real, unpadded token and patch counts, the same count for
every side): decoder ``2 * matmul params * tokens`` plus causal attention ``2 * d * n * (n + 1)`` per
layer and row; vision tower: patch embedding, ``2 * block matmul params * patches`` plus
``4 * E * P**2`` per block and image, the merger; no LM head, no embedding lookups. With the prefix
cache the system segment still counts (model FLOPs, not executed ones), so FLOP rates compare like
the speeds. On a GPU the table shows MFU against ``--peak-tflops`` (default 989: H100/H200 SXM,
dense bf16); on a CPU achieved GFLOP/s.

Threads: torch uses ``--torch-threads`` (default: every core); XLA's CPU backend uses every core.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from common import BUSY_CORES, CpuMeter, csv_list, qwen2_vl_2b_width

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = {  # name -> (description, role)
    "docs": ("short documents", "document"),
    "text": ("text queries", "query"),
    "image": ("image+text queries", "query"),
    "mixed": ("mixed-size images", "query"),
}
# The mixed workload's native sizes (drawn uniformly per row), pre-resized with the official `random`
# mode (aspect clamped to 2, long side <= 992, short side >= 336): 576 to 3,780 patches an image.
MIXED_SIZES = ((640, 480), (500, 375), (480, 640), (224, 224), (1024, 768), (1200, 400), (336, 336), (2000, 1500))
# --memory: the eight photographs of issue 33, each already inside the `random` bounds.
PHOTO_SIZES = ((640, 480), (992, 744), (336, 336), (480, 640), (800, 400), (504, 378), (720, 540), (448, 896))
QWEN2_VL_MIN_PIXELS, QWEN2_VL_MAX_PIXELS = 56 * 56, 28 * 28 * 1280
MIN_COSINE_FLOAT32 = 0.99999
MIN_COSINE_LOW_PRECISION = 0.99  # bfloat16/float16: a warning only
DTYPES = ("float32", "bfloat16")  # what both frameworks load here
SIDES = {"g2e": "g2e_jax", "g2e_cache": "g2e_jax + prefix cache", "torch": "PyTorch"}


# --------------------------------------------------------------------------------------------------
# Workloads

LABEL_NOUNS = (
    "fox", "retriever", "tabby cat", "sports car", "fire truck", "espresso", "mountain bike", "teapot",
    "lighthouse", "violin", "pizza", "goldfish", "umbrella", "school bus", "hummingbird", "pineapple",
    "bookcase", "canoe", "snail", "volcano", "tractor", "jellyfish", "banjo", "pretzel", "zebra",
)  # fmt: skip
LABEL_ADJECTIVES = (
    "red", "small", "wild", "golden", "striped", "wooden", "electric", "frozen", "spotted", "vintage",
    "giant", "black", "white", "green",
)  # fmt: skip
QUERY_INSTRUCTIONS = (
    "Find me an everyday image that matches the given caption:",
    "Retrieve a Wikipedia paragraph that answers this question:",
    "Given a news headline, find the article it belongs to:",
    "Find a product description that matches this review:",
)
SUBJECTS = (
    "a young woman", "two dogs", "an old fisherman", "a group of students", "the city council",
    "a small robot", "three children", "a delivery driver",
)  # fmt: skip
VERBS = (
    "walks along",
    "waits beside",
    "talks about",
    "looks at",
    "repairs",
    "paints",
    "carries",
    "photographs",
)
OBJECTS = (
    "the quiet harbour", "a broken bicycle", "the crowded market", "an empty train station",
    "a tall glass building", "the frozen lake", "a bowl of fresh fruit", "the wooden bridge",
)  # fmt: skip
TAILS = (
    "in the early morning", "after a long rainy day", "while the sun sets behind the hills",
    "during the summer festival", "before the shops open", "under a bright blue sky",
)  # fmt: skip
QUESTIONS = (
    "What is in the image?", "How many people are there?", "What color is the car?",
    "Where was this photo taken?", "What is the man holding?", "Is it raining?",
)  # fmt: skip


@dataclasses.dataclass
class Workload:
    name: str
    role: str
    texts: list[str]
    images: list  # PIL images or None, one per row


def smooth_image(rng, width: int, height: int):
    """Smooth random content: a random 8x8 image upsampled, plus a little noise."""
    from PIL import Image

    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    pixels = np.asarray(small.resize((width, height), Image.BICUBIC), np.int16)
    pixels = pixels + rng.integers(-8, 9, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_workload(name: str, n: int, *, seed: int, image_size: int, query_tokens: int, tokenizer) -> Workload:
    """``n`` rows, the same for a given seed whatever ``n`` (a smaller run takes a prefix)."""
    from g2e_jax.data.images import resize_for_resolution
    from g2e_jax.prompts import IMAGE_MARKER

    kinds = [*WORKLOADS, "photos"]
    rng = np.random.default_rng([seed, kinds.index(name)])

    def pick(options):
        return options[int(rng.integers(len(options)))]

    texts, images = [], []
    for _ in range(n):
        if name == "docs":
            noun = pick(LABEL_NOUNS)
            texts.append(noun if rng.random() < 0.75 else f"{pick(LABEL_ADJECTIVES)} {noun}")
            images.append(None)
        elif name == "text":
            text, k = pick(QUERY_INSTRUCTIONS) + " " + pick(SUBJECTS).capitalize(), 0
            while len(tokenizer.encode(text + ".")) < query_tokens:  # grow a sentence piece by piece
                text += " " + pick((VERBS, OBJECTS, TAILS)[k % 4]) if k % 4 < 3 else ", and " + pick(SUBJECTS)
                k += 1
            texts.append(text + ".")
            images.append(None)
        else:
            texts.append(
                f"{IMAGE_MARKER}\nRepresent the given image with the following question: {pick(QUESTIONS)}"
            )
            if name == "image":
                images.append(smooth_image(rng, image_size, image_size))
            else:
                sizes = MIXED_SIZES if name == "mixed" else PHOTO_SIZES
                size = pick(sizes) if name == "mixed" else sizes[len(images) % len(sizes)]
                images.append(resize_for_resolution(smooth_image(rng, *size), "random"))
    return Workload(name, "query" if name == "photos" else WORKLOADS[name][1], texts, images)


def write_model(name: str, work: Path, args) -> tuple[Path, str]:
    """The HF directory (random weights, Qwen2-VL's pixel bounds) and its label."""
    from g2e_jax.models.qwen2_vl.hf_files import write_processor_files
    from g2e_jax.models.qwen2_vl.tiny import make_tiny, tiny_config

    if name == "tiny":
        cfg, seed, label = tiny_config(), 0, "tiny"
    else:
        cfg, seed = qwen2_vl_2b_width(args.layers, args.vision_blocks), 1
        label = f"2b-width-L{args.layers}V{args.vision_blocks}"
    path = make_tiny(work / label, seed=seed, config=cfg)
    write_processor_files(
        path,
        min_pixels=QWEN2_VL_MIN_PIXELS,
        max_pixels=QWEN2_VL_MAX_PIXELS,
        patch_size=cfg.vision.patch_size,
        temporal_patch_size=cfg.vision.temporal_patch_size,
        merge_size=cfg.vision.spatial_merge_size,
    )
    return path, label


# --------------------------------------------------------------------------------------------------
# The two sides


def has_prefix_cache() -> bool:
    from g2e_jax import Embedder

    return "prefix_cache" in inspect.signature(Embedder.__init__).parameters


class JaxSide:
    """One set of weights; an ``Embedder`` per variant (prefix cache off / on), sharing them."""

    def __init__(self, path: Path, args):
        from g2e_jax import Embedder
        from g2e_jax.io import weights_fingerprint
        from g2e_jax.models.qwen2_vl import load
        from g2e_jax.preprocess import Preprocessor

        model = load(path, dtype=args.dtype, progress=False)
        self.config = model.config
        self.pre = Preprocessor.from_pretrained(
            path, prompt="hierarchical", scheme=args.scheme, max_len=args.max_len
        )
        kwargs = dict(batch_size=args.batch_size, model_path=path, weights_id=weights_fingerprint(path))
        if has_prefix_cache():
            self.variants = {
                "g2e": Embedder(model, self.pre, prefix_cache=False, **kwargs),
                "g2e_cache": Embedder(model, self.pre, prefix_cache=True, **kwargs),
            }
        else:
            self.variants = {"g2e": Embedder(model, self.pre, **kwargs)}

    def prepare(self, w: Workload):
        return self.pre.prepare(w.texts, w.images, role=w.role, progress=False)

    def run(self, variant: str, rows, role: str) -> tuple[np.ndarray, float]:
        """(embeddings, seconds) of one ``encode_prepared`` call; it ends with numpy results."""
        start = time.perf_counter()
        out = self.variants[variant].encode_prepared(rows, role=role, progress=False)
        return out, time.perf_counter() - start

    def run_raw(self, variant: str, w: Workload) -> tuple[np.ndarray, float]:
        """(embeddings, seconds) of one ``encode`` call on the raw rows (preprocessing included)."""
        start = time.perf_counter()
        out = self.variants[variant].encode(w.texts, w.images, role=w.role, progress=False)
        return out, time.perf_counter() - start


class TorchSide:
    """transformers' Qwen2-VL (sdpa) and the official pipeline's tokenisation."""

    def __init__(self, path: Path, args, device: str):
        import torch
        from transformers import Qwen2VLForConditionalGeneration
        from transformers.utils import logging as hf_logging

        from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor

        hf_logging.disable_progress_bar()
        model = Qwen2VLForConditionalGeneration.from_pretrained(
            path, dtype=getattr(torch, args.dtype), attn_implementation="sdpa", local_files_only=True
        )
        self.model = model.eval().to(device)
        self.backbone = self.model.model
        self.processor = load_hf_processor(path)
        self.device = device
        self.scheme = args.scheme
        self.batch_size = args.batch_size

    def batches(self, w: Workload) -> list[tuple[dict, object]]:
        """Processor outputs and positions of every batch, in input order, on the host."""
        import torch
        from hf_reference import official_template

        from g2e_jax.prompts import PAPER_SYSTEM

        strings = [
            official_template(
                t, has_image=im is not None, role=w.role, system=PAPER_SYSTEM, scheme=self.scheme
            )
            for t, im in zip(w.texts, w.images)
        ]
        out = []
        for start in range(0, len(strings), self.batch_size):
            images = [im for im in w.images[start : start + self.batch_size] if im is not None]
            enc = self.processor(
                text=strings[start : start + self.batch_size], images=images or None, padding=True,
                return_tensors="pt",
            )  # fmt: skip
            mask = enc["attention_mask"]
            inputs = {"input_ids": enc["input_ids"], "attention_mask": mask}
            if images:
                inputs.update(
                    pixel_values=enc["pixel_values"],
                    image_grid_thw=enc["image_grid_thw"],
                    mm_token_type_ids=enc["mm_token_type_ids"],
                )
            if self.scheme == "gen2embed":  # Gen2Embed's positions for bare <|image_pad|> runs
                positions = (mask.cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1).contiguous()
            else:
                with torch.inference_mode():
                    positions, _ = self.backbone.get_rope_index(
                        enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"],
                        image_grid_thw=enc.get("image_grid_thw"), attention_mask=mask,
                    )  # fmt: skip
            inputs["position_ids"] = positions
            out.append((inputs, mask.sum(-1) - 1))
        return out

    def run(self, batches) -> tuple[np.ndarray, float]:
        """(embeddings, seconds) of the whole workload, ending with numpy results."""
        return self._run(lambda: batches)

    def run_raw(self, w: Workload) -> tuple[np.ndarray, float]:
        """The same from the raw rows: the processor's work inside the timed region."""
        return self._run(lambda: self.batches(w))

    def _run(self, make_batches) -> tuple[np.ndarray, float]:
        import torch

        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        batches = make_batches()
        outs = []
        with torch.inference_mode():
            for inputs, last in batches:
                inputs = {k: v.to(self.device) for k, v in inputs.items()}
                hidden = self.backbone(**inputs).last_hidden_state
                pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
                outs.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy())
        if cuda:
            torch.cuda.synchronize()
        return np.concatenate(outs), time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# FLOPs


def model_flops(cfg, seq_lens, grids) -> dict:
    """Forward FLOPs of the rows (multiply-add = 2): real tokens and patches only, no LM head."""
    t, v = cfg.text, cfg.vision
    d, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
    token_params = 2 * d * d + 2 * d * kv + 3 * d * t.intermediate_size  # q, o, k, v, gate/up/down
    n = np.asarray(seq_lens, np.float64)
    decoder = t.num_hidden_layers * (2 * token_params * n.sum() + 2 * d * (n * (n + 1)).sum())
    e, m2 = v.embed_dim, v.spatial_merge_size**2
    block_params = 4 * e * e + 2 * e * v.mlp_dim  # qkv, proj, fc1, fc2
    vision = 0.0
    for grid in grids:
        frames, hw = int(grid[0]), int(grid[1]) * int(grid[2])
        patches = frames * hw
        vision += 2 * v.patch_dim * e * patches  # patch embedding
        vision += v.depth * (2 * block_params * patches + 4 * e * frames * hw**2)  # attention per frame
        vision += 2 * (patches // m2) * ((e * m2) ** 2 + e * m2 * t.hidden_size)  # merger MLP
    return {"decoder": float(decoder), "vision": float(vision), "total": float(decoder + vision)}


# --------------------------------------------------------------------------------------------------
# Driver


def bench_workload(label, jside: JaxSide, tside: TorchSide, w: Workload, args, on_gpu: bool, log) -> dict:
    """Every side on one workload, in turn within each repeat (repeat 0: warm-up)."""
    rows = jside.prepare(w)
    batches = tside.batches(w)
    n_sys, n_head = len(jside.pre.system_ids(w.role)), len(jside.pre.header_ids)
    seq_lens = [n_sys + len(r.user_ids) + n_head for r in rows]
    torch_lens = np.concatenate([inputs["attention_mask"].sum(-1).numpy() for inputs, _ in batches])
    grids = [r.grid_thw for r in rows if r.grid_thw is not None]
    flops = model_flops(jside.config, seq_lens, grids)
    if args.end_to_end:
        runs = {name: (lambda name=name: jside.run_raw(name, w)) for name in jside.variants}
        runs["torch"] = lambda: tside.run_raw(w)
    else:
        runs = {name: (lambda name=name: jside.run(name, rows, w.role)) for name in jside.variants}
        runs["torch"] = lambda: tside.run(batches)
    stats = jside.variants["g2e"].patch_stats
    stats.update(real=0, stream=0, keys=0)

    times = {name: [] for name in runs}
    outputs, background = {}, []
    for i in range(1 + args.repeats):
        with CpuMeter() as meter:
            for name, fn in runs.items():
                outputs[name], seconds = fn()
                times[name].append(seconds)
        background.append(meter.background_cores)
        bg = "n/a" if meter.background_cores is None else f"{meter.background_cores:.2f}"
        log(
            f"  {'warm-up' if i == 0 else f'repeat {i}'}: "
            + ", ".join(f"{SIDES[k]} {v[-1]:.3f} s" for k, v in times.items())
            + f"; other processes kept {bg} cores busy"
        )

    ref = outputs["torch"] / np.linalg.norm(outputs["torch"], axis=-1, keepdims=True)
    result = {
        "model": label,
        "workload": w.name,
        "description": WORKLOADS[w.name][0],
        "timed": "end to end (raw rows)" if args.end_to_end else "prepared rows",
        "role": w.role,
        "rows": len(rows),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "system_tokens": n_sys,
        "tokens_per_row": float(np.mean(seq_lens)),
        "user_tokens_per_row": float(np.mean([len(r.user_ids) for r in rows])),  # content, suffix, image
        "images": len(grids),
        "patches_per_image": float(np.mean([np.prod(g) for g in grids])) if grids else 0.0,
        "torch_padded_tokens": int(sum(inputs["attention_mask"].numel() for inputs, _ in batches)),
        "tokens_match": bool(np.array_equal(np.asarray(seq_lens), torch_lens)),
        "flops": flops,
        "background_cores": statistics.mean([b for b in background[1:] if b is not None] or [float("nan")]),
        "sides": {},
    }
    for name, ts in times.items():
        median = statistics.median(ts[1:])
        side = {"warmup_s": ts[0], "times_s": ts[1:], "median_s": median, "emb_per_s": len(rows) / median,
                "gflop_per_s": flops["total"] / median / 1e9}  # fmt: skip
        if on_gpu:
            side["mfu"] = flops["total"] / median / (args.peak_tflops * 1e12)
        if name != "torch":
            ours = outputs[name] / np.linalg.norm(outputs[name], axis=-1, keepdims=True)
            side["min_cosine"] = float((ours * ref).sum(-1).min())
            side["speed_vs_torch"] = side["emb_per_s"] / (len(rows) / statistics.median(times["torch"][1:]))
        result["sides"][name] = side
    if stats["real"]:
        stream, keys = input_order_slots(jside, rows, args.batch_size)
        result["patch_slots"] = {
            "stream_per_patch": stats["stream"] / stats["real"],
            "keys_per_patch": stats["keys"] / stats["real"],
            "stream_per_patch_input_order": stream,
            "keys_per_patch_input_order": keys,
        }
    if "g2e_cache" in times:
        result["prefix_cache_speedup"] = (
            result["sides"]["g2e_cache"]["emb_per_s"] / result["sides"]["g2e"]["emb_per_s"]
        )
    if not result["tokens_match"]:
        log("  WARNING: real token counts differ between g2e_jax and the reference processor")
    return result


def input_order_slots(jside: JaxSide, rows, batch_size: int) -> tuple[float, float]:
    """(stream, key) slots per real patch had the batches kept the rows' input order (no size sort)."""
    from g2e_jax.encode_loop import PATCH_STEPS
    from g2e_jax.preprocess import bucket

    emb = jside.variants["g2e"]
    real = stream = keys = 0
    for start in range(0, len(rows), batch_size):
        sizes = [len(r.patches) for r in rows[start : start + batch_size] if r.patches is not None]
        if sizes:
            real += sum(sizes)
            stream += bucket(sum(sizes), emb.patch_bucket_base, per_octave=PATCH_STEPS)
            keys += len(sizes) * bucket(max(sizes), emb.patch_bucket_base, per_octave=PATCH_STEPS)
    return stream / real, keys / real


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def print_table(results, args, on_gpu: bool, depth_note: str, cached: bool):
    perf = "MFU g2e/torch" if on_gpu else "GFLOP/s g2e/torch"
    head = (
        f"{'model':<20} {'workload':<19} {'rows':>5} {'tok/row':>7} {'g2e emb/s':>10} {'+cache emb/s':>12} "
        f"{'torch emb/s':>11} {'g2e/torch':>9} {'+cache/torch':>12} {'cache x':>7} {'min cos':>9} "
        f"{perf:>17} {'bg cores':>8}"
    )
    print(
        f"\n{args.dtype} on {args.device_label}, batch size {args.batch_size}, median of {args.repeats} runs, "
        + ("end to end from the raw rows (preprocessing timed)" if args.end_to_end else "prepared rows")
    )
    if depth_note:
        print(depth_note)
    print(head)
    print("-" * len(head))
    for r in results:
        s = r["sides"]
        c = s.get("g2e_cache")
        best = c if c is not None and c["emb_per_s"] > s["g2e"]["emb_per_s"] else s["g2e"]
        if on_gpu:
            perf_cell = f"{100 * best['mfu']:.1f}%/{100 * s['torch']['mfu']:.1f}%"
        else:
            perf_cell = f"{best['gflop_per_s']:.1f}/{s['torch']['gflop_per_s']:.1f}"
        min_cos = min(v["min_cosine"] for k, v in s.items() if k != "torch")
        print(
            f"{r['model']:<20} {r['description']:<19} {r['rows']:>5} {r['tokens_per_row']:>7.1f} "
            f"{s['g2e']['emb_per_s']:>10.1f} {_fmt(c and c['emb_per_s'], '.1f'):>12} "
            f"{s['torch']['emb_per_s']:>11.1f} {s['g2e']['speed_vs_torch']:>9.2f} "
            f"{_fmt(c and c['speed_vs_torch'], '.2f'):>12} {_fmt(r.get('prefix_cache_speedup'), '.2f'):>7} "
            f"{min_cos:>9.7f} {perf_cell:>17} {_fmt(r['background_cores'], '.2f'):>8}"
        )
    print(
        "emb/s: rows / median seconds of a whole-workload call (warm-up excluded); g2e/torch, "
        "+cache/torch: speed ratios; cache x: prefix-cache speed-up; min cos: lowest cosine between "
        "g2e_jax and reference embeddings; tok/row: real tokens per row (system segment included)."
    )
    for r in results:
        if "patch_slots" in r:
            ps = r["patch_slots"]
            print(
                f"{r['model']} / {r['description']}: {r['patches_per_image']:.0f} patches an image on average; "
                f"slots per real patch, sorted by size (in input order): vision stream "
                f"{ps['stream_per_patch']:.3f} ({ps['stream_per_patch_input_order']:.3f}), keys "
                f"{ps['keys_per_patch']:.3f} ({ps['keys_per_patch_input_order']:.3f})"
            )
    if on_gpu:
        peak = f"{args.peak_tflops:g} TFLOP/s (--peak-tflops)"
        print(f"MFU: analytic model FLOPs / time / {peak}, best g2e variant / PyTorch.")
    else:
        print("GFLOP/s: analytic model FLOPs / time, best g2e variant / PyTorch.")
    if not cached:
        print("NOTE: this Embedder has no prefix_cache argument: the cached variant was skipped.")
    busy = [r["background_cores"] for r in results if (r["background_cores"] or 0.0) > BUSY_CORES]
    if busy and not on_gpu:
        print(
            f"WARNING: other processes kept up to {max(busy):.2f} cores busy during the timed runs: the "
            "times (torch's above all: its OpenMP threads stall when a core is taken) are not an idle "
            "machine's: rerun on an idle machine, or compare with --torch-threads 1."
        )


def memory_child(args) -> None:
    """--rss-child SIDE: encode the photos workload once on one side (a fresh process) and write the
    embeddings (``.npy``) and {peak_rss_mib, seconds} (``.json``) next to ``--child-out``."""
    import resource

    from g2e_jax.tokenization import Tokenizer

    path = Path(args.model_dir)
    w = make_workload("photos", len(PHOTO_SIZES), seed=args.seed, image_size=args.image_size,
                      query_tokens=args.query_tokens, tokenizer=Tokenizer(path))  # fmt: skip
    if args.rss_child == "g2e":
        from g2e_jax import Embedder

        start = time.perf_counter()
        emb = Embedder.from_pretrained(path, dtype=args.dtype, max_len=args.max_len, batch_size=args.batch_size,
                                       scheme=args.scheme, progress=False)  # fmt: skip
        out = emb.encode(w.texts, w.images, role=w.role, progress=False)
        seconds = time.perf_counter() - start
    else:
        start = time.perf_counter()
        side = TorchSide(path, args, "cpu")
        out, _ = side.run(side.batches(w))
        seconds = time.perf_counter() - start
    np.save(args.child_out + ".npy", out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.child_out + ".json").write_text(json.dumps({"peak_rss_mib": peak, "seconds": seconds}))


def memory_bench(args, work: Path, log) -> dict:
    """Each side in its own fresh process on the photos workload (see --memory)."""
    path, label = write_model("2b", work, args)
    sides = {}
    for side in ("g2e", "torch"):
        out = str(work / f"photos_{side}")
        cmd = [sys.executable, __file__, "--rss-child", side, "--model-dir", str(path), "--child-out", out,
               "--dtype", args.dtype, "--scheme", args.scheme, "--max-len", str(args.max_len),
               "--batch-size", str(args.batch_size), "--torch-threads", str(args.torch_threads)]  # fmt: skip
        log(f"{label} / the eight photographs of issue 33: {SIDES[side]} in a fresh process")
        with CpuMeter() as meter:
            subprocess.run(cmd, check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        sides[side] = json.loads(Path(out + ".json").read_text())
        sides[side]["embeddings"] = np.load(out + ".npy")
        sides[side]["background_cores"] = meter.background_cores
    a, b = (sides[k].pop("embeddings") for k in ("g2e", "torch"))
    cos = (a / np.linalg.norm(a, axis=-1, keepdims=True) * b / np.linalg.norm(b, axis=-1, keepdims=True)).sum(-1)
    result = {"model": label, "photos": [f"{w}x{h}" for w, h in PHOTO_SIZES], "sides": sides,
              "rss_ratio": sides["g2e"]["peak_rss_mib"] / sides["torch"]["peak_rss_mib"],
              "min_cosine": float(cos.min())}  # fmt: skip
    print(f"\n{label}, the eight photographs of issue 33 ({', '.join(result['photos'])}), {args.dtype}, one call "
          "per side in a fresh process:")  # fmt: skip
    for k, v in sides.items():
        extra = " (compilation included)" if k == "g2e" else ""
        print(f"  {SIDES[k]:<8} peak RSS {v['peak_rss_mib'] / 1024:.2f} GiB, {v['seconds']:.1f} s{extra}, "
              f"bg cores {_fmt(v['background_cores'], '.2f')}")  # fmt: skip
    print(f"  peak RSS g2e_jax / PyTorch {result['rss_ratio']:.2f}; min cosine {result['min_cosine']:.7f}")
    return result


def _git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + (" (dirty)" if dirty.stdout.strip() else "")


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info(args, on_gpu: bool) -> dict:
    import flax
    import jax
    import jaxlib
    import torch
    import transformers

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "device": args.device_label,
        "jax_backend": jax.default_backend(),
        "jax_device_kind": jax.devices()[0].device_kind,
        "torch_device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
        },  # fmt: skip
        "prefix_cache_available": has_prefix_cache(),
        "peak_tflops": args.peak_tflops if on_gpu else None,
    }


def _rows_flag(value: str) -> dict[str, int]:
    counts = [int(v) for v in csv_list(value)]
    if len(counts) != len(WORKLOADS):
        raise argparse.ArgumentTypeError(f"expected {len(WORKLOADS)} counts ({','.join(WORKLOADS)})")
    return dict(zip(WORKLOADS, counts))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, few rows (smoke test)")
    parser.add_argument("--models", default="tiny,2b", help="comma list of tiny, 2b")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the 2b model")
    parser.add_argument("--vision-blocks", type=int, default=2, help="vision blocks of the 2b model")
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma list of " + ", ".join(WORKLOADS)
    )
    parser.add_argument(
        "--tiny-rows", type=_rows_flag, default="256,128,32,32", help="rows of docs,text,image,mixed"
    )
    parser.add_argument(
        "--2b-rows", dest="rows_2b", type=_rows_flag, default="64,32,8,32", help="rows of docs,text,image,mixed"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch, both sides")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (median)")
    parser.add_argument("--image-size", type=int, default=448, help="side of the square test images")
    parser.add_argument("--query-tokens", type=int, default=40, help="content tokens of a text query")
    parser.add_argument("--scheme", default="gen2embed", choices=("gen2embed", "mrope"))
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    parser.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="GPU peak for MFU (989: H100/H200 bf16)"
    )
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="where to write the models (default: a temporary folder)")
    parser.add_argument("--out", help="JSON file (default: bench/results/encode_<device>[_quick].json)")
    parser.add_argument(
        "--end-to-end", action="store_true", help="time from the raw rows (preprocessing included) on both sides"
    )
    parser.add_argument("--memory", action="store_true", help="only the peak-RSS comparison (CPU, 2b widths)")
    parser.add_argument("--rss-child", choices=("g2e", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        import torch

        os.environ["JAX_PLATFORMS"] = "cpu"
        args.dtype = args.dtype or "float32"
        sys.path.insert(0, str(REPO / "tests"))
        torch.set_num_threads(args.torch_threads)
        if args.dtype == "float32":
            import jax

            jax.config.update("jax_default_matmul_precision", "highest")
        return memory_child(args)
    if args.quick:
        args.models = "tiny"
        args.tiny_rows = {"docs": 32, "text": 16, "image": 8, "mixed": 8}
    args.models = ["2b" if m == "2b-width" else m for m in csv_list(args.models)]
    args.workloads = csv_list(args.workloads)
    for m in args.models:
        if m not in ("tiny", "2b"):
            parser.error(f"unknown model {m!r}")
    for w in args.workloads:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r}")
    planned = {
        (m, w): (args.tiny_rows if m == "tiny" else args.rows_2b)[w]
        for m in args.models
        for w in args.workloads
    }
    uneven = [f"{m}/{w}={n}" for (m, w), n in planned.items() if n % args.batch_size]
    if uneven:  # g2e_jax pads its last batch to a full one (fixed shapes), the reference runs it short
        print(f"NOTE: row counts not a multiple of --batch-size {args.batch_size}: {', '.join(uneven)}")

    import torch

    # The device decides how JAX starts, so it is settled before JAX is imported.
    on_gpu = args.device == "gpu" or (args.device == "auto" and torch.cuda.is_available())
    if on_gpu and not torch.cuda.is_available():
        parser.error("--device gpu: torch sees no CUDA device")
    if on_gpu:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory to torch
    else:
        os.environ["JAX_PLATFORMS"] = "cpu"
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    sys.path.insert(0, str(REPO / "tests"))  # hf_reference: the official pipeline's template
    import jax

    if on_gpu and jax.default_backend() != "gpu":
        parser.error(f"--device gpu: JAX's default backend is {jax.default_backend()!r}")
    if args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")  # float32 parity (as the tests)
    torch.set_num_threads(args.torch_threads)
    device = "cuda" if on_gpu else "cpu"
    args.device_label = (
        f"{torch.cuda.get_device_name()} (GPU)" if on_gpu else f"CPU ({os.cpu_count()} cores, {_cpu_model()})"
    )
    suffix = ("_end_to_end" if args.end_to_end else "") + ("_quick" if args.quick else "")
    default_out = f"encode_{'gpu' if on_gpu else 'cpu'}{suffix}.json"
    out = Path(args.out) if args.out else REPO / "bench" / "results" / default_out

    def log(msg):
        print(msg, flush=True)

    cached = has_prefix_cache()
    log(
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, {device}), {os.cpu_count()} CPU cores, {args.dtype}"
    )
    if not cached:
        log("NOTE: Embedder has no prefix_cache argument yet: only g2e_jax without the cache is measured.")

    from g2e_jax.tokenization import Tokenizer

    started = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bench_encode_") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    results = []
    if args.memory:
        if on_gpu:
            parser.error("--memory compares host memory: run it on a CPU")
        try:
            result = memory_bench(args, work, log)
        finally:
            if tmp is not None:
                tmp.cleanup()
        out = Path(args.out) if args.out else REPO / "bench" / "results" / "encode_memory_cpu.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": machine_info(args, on_gpu), "memory": result}, indent=2) + "\n")
        log(f"\nwrote {out}")
        if args.dtype == "float32" and result["min_cosine"] < MIN_COSINE_FLOAT32:
            log(f"!! PARITY FAILURE: photos: min cosine {result['min_cosine']:.7f} < {MIN_COSINE_FLOAT32}")
            sys.exit(1)
        return
    try:
        for name in args.models:
            path, label = write_model(name, work, args)
            tokenizer = Tokenizer(path)
            counts = args.tiny_rows if name == "tiny" else args.rows_2b
            jside = JaxSide(path, args)
            tside = TorchSide(path, args, device)
            for wname in args.workloads:
                w = make_workload(wname, counts[wname], seed=args.seed, image_size=args.image_size,
                                  query_tokens=args.query_tokens, tokenizer=tokenizer)  # fmt: skip
                log(f"{label} / {WORKLOADS[wname][0]}: {len(w.texts)} rows, {args.repeats} timed runs")
                results.append(bench_workload(label, jside, tside, w, args, on_gpu, log))
                gc.collect()
            del jside, tside
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
    finally:
        if tmp is not None:
            tmp.cleanup()

    depth = (
        f"2b-width-L{args.layers}V{args.vision_blocks} = Qwen2-VL-2B widths at {args.layers} decoder layers "
        f"+ {args.vision_blocks} vision blocks (the full model has 28 + 32)"
        if "2b" in args.models
        else ""
    )
    print_table(results, args, on_gpu, depth, cached)
    threshold = MIN_COSINE_FLOAT32 if args.dtype == "float32" else MIN_COSINE_LOW_PRECISION
    bad = [
        (r["model"], r["workload"], k, v["min_cosine"])
        for r in results
        for k, v in r["sides"].items()
        if k != "torch" and v["min_cosine"] < threshold
    ]
    bad += [(r["model"], r["workload"], "token counts", None) for r in results if not r["tokens_match"]]
    meta = machine_info(args, on_gpu)
    meta.update(depth=depth, seconds_total=time.perf_counter() - started, min_cosine_threshold=threshold,
                args={k: v for k, v in vars(args).items()})  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.parent == REPO / "bench" / "results" and not (out.parent / ".gitignore").exists():
        (out.parent / ".gitignore").write_text("*\n")  # results stay out of git
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    log(f"\nwrote {out} ({meta['seconds_total']:.0f} s in all)")
    if bad:
        log("\n" + "!" * 100)
        for model, workload, side, cos in bad:
            what = "token counts differ" if cos is None else f"min cosine {cos:.7f} < {threshold}"
            log(f"!! PARITY FAILURE: {model} / {workload} / {side}: {what}")
        log("!" * 100)
        if args.dtype == "float32":
            sys.exit(1)


if __name__ == "__main__":
    main()
