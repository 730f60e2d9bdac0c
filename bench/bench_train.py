"""Training step time: g2e_jax's jitted ``train_step`` vs a PyTorch reference step, same model and rows.

    python bench/bench_train.py            # tiny model + Qwen2-VL-2B widths at 2 decoder layers
    python bench/bench_train.py --quick    # tiny model only (smoke test)

Both frameworks load one Hugging Face directory written by ``make_tiny`` (random weights) and train on
the same N pairs drawn from the synthetic MMEB set: g2e_jax through ``Preprocessor`` + ``build_batch``
+ ``train_step`` (jitted, float32, LoRA or full fine-tuning, GradCache on or off); the reference
through the official pipeline (full template strings -> HF processor, tokenised once ->
``model.model`` with sequential positions -> last-token pooling -> normalise), ``cross_entropy(q @
t.T / 0.02, arange)``, backward, gradient clipping and ``torch.optim.AdamW`` with the same schedule.
The reference step has no GradCache, so both GradCache rows share its time. Compilation and the
first (warm-up) step are excluded from the times; the first step's losses are compared (same
weights, same LoRA init copied from PEFT, same rows), and so is the last step's, which checks the
whole update (gradients, clipping, AdamW) rather than the forward alone.

Peak memory of the compiled g2e_jax step (XLA's ``memory_analysis``: temp + argument bytes) is
reported at N and 2N pairs with GradCache on and off: without GradCache the temp buffers grow with
the batch, with it they grow with the chunk size only.

The variants run step by step in turn, and the cores other processes keep busy meanwhile are
measured (``bg cores``). On a shared machine read that column first: torch's OpenMP threads stall
whenever another process takes a core (a tiny-model step goes from ~0.03 s to 1-6 s with 2 threads,
while g2e_jax barely moves), so compare there with ``--torch-threads 1`` or on an idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import BUSY_CORES, CpuMeter, csv_list, qwen2_vl_2b_width

REPO = Path(__file__).resolve().parents[1]
TEMPERATURE = 0.02
# PEFT's spelling of g2e_jax.adapters.lora.DEFAULT_TARGETS (transformers 5 module names).
HF_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.down_proj)"
TOTAL_STEPS = 1000  # only shapes the linear-decay schedule; the same in both frameworks


# --------------------------------------------------------------------------------------------------
# Models and data


@dataclasses.dataclass(frozen=True)
class Pair:
    """One training pair as raw rows: both frameworks preprocess it their own way."""

    subset: str
    qry: str
    qry_image: str | None
    pos: str
    pos_image: str | None


def _describe(truth, image_root: Path, path: str) -> str:
    """What an image shows, as text (a scene's caption, a crop's label): the text-only view of a side."""
    from g2e_jax.data.synthetic import Crop, caption

    content = truth[Path(path).relative_to(image_root).as_posix()]
    return content.label if isinstance(content, Crop) else caption(content)


def workload_pairs(data: Path, truth, subsets: list[str], n: int, *, text_only: bool) -> list[Pair]:
    """``n`` pairs taken round-robin from ``subsets`` (so every chunk mixes them). ``text_only``
    replaces each side's image (and its marker) by what the image shows, leaving text-only pairs."""
    from g2e_jax.data.mmeb import read_train
    from g2e_jax.prompts import IMAGE_MARKER

    per_subset = []
    for subset in subsets:
        rows = read_train(data / "train", subset, image_dir=data / "images")
        pairs = []
        for r in rows:
            q, qi, t, ti = r.qry, r.qry_image, r.pos_text, r.pos_image
            if text_only:
                if qi:
                    q, qi = (
                        q.replace(IMAGE_MARKER, "").strip() + " " + _describe(truth, data / "images", qi),
                        None,
                    )
                if ti:
                    t, ti = _describe(truth, data / "images", ti), None
            pairs.append(Pair(subset, q, qi or None, t, ti or None))
        per_subset.append(pairs)
    out = [p for group in zip(*per_subset) for p in group][:n]
    if len(out) < n:
        raise ValueError(f"{subsets}: only {len(out)} pairs for a batch of {n}")
    return out


# --------------------------------------------------------------------------------------------------
# g2e_jax


def hf_module_name(path: str) -> str:
    """g2e_jax module path -> transformers 5's in-memory module name."""
    from g2e_jax.models.qwen2_vl import NAME_MAP

    hub = NAME_MAP.to_hf(path + ".kernel")[0].removesuffix(".weight")
    return "model.language_model." + hub.removeprefix("model.")


def _set_adapter(model, path: str, a, b):
    """PEFT's A [r, in], B [out, r] into the adapter at the per-layer ``path`` (its slice of a stack)."""
    import jax.numpy as jnp

    from g2e_jax.adapters.lora import find_stacks
    from g2e_jax.models.name_map import stacked_path

    path, _, index = stacked_path(path, find_stacks(model))
    node = model
    for key in path.split("."):
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    for var, value in ((node.lora_a, a.T), (node.lora_b, b.T)):
        value = jnp.asarray(value)
        var.set_value(value if index is None else var.get_value().at[index].set(value))


class JaxSide:
    """The model split into trainable params / the rest, the optimizer and the prepared rows."""

    def __init__(self, path: Path, adapter: str, lora_init: dict | None, args):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from g2e_jax.models.qwen2_vl import load
        from g2e_jax.preprocess import Preprocessor
        from g2e_jax.adapters.lora import AdapterConfig, apply_adapters, trainable_filter
        from g2e_jax.train.step import make_optimizer

        model = load(path, progress=False)
        acfg = AdapterConfig(kind=adapter, rank=args.rank, alpha=args.alpha, dropout=0.0)
        for p in apply_adapters(model, acfg, rngs=nnx.Rngs(args.seed)):
            a, b = lora_init[hf_module_name(p)]  # PEFT [out, in] layout -> ours [in, out]
            _set_adapter(model, p, a, b)
        self.args = args
        self.graphdef, self.init_params, self.rest = nnx.split(model, trainable_filter(acfg), ...)
        self.trainable = int(sum(x.size for x in jax.tree.leaves(self.init_params)))
        self.tx = make_optimizer(
            learning_rate=args.lr, total_steps=TOTAL_STEPS, warmup_steps=0, max_grad_norm=1.0
        )
        self.pre = Preprocessor.from_pretrained(path, prompt="hierarchical", scheme="gen2embed", max_len=1024)
        self.consts = {
            side: (jnp.asarray(self.pre.system_ids(role)), jnp.asarray(self.pre.header_ids))
            for side, role in (("query", "query"), ("target", "document"))
        }

    def prepare(self, pairs: list[Pair]):
        from g2e_jax.data.prepared import content_id

        out = []
        for p in pairs:
            (q,) = self.pre.prepare([p.qry], [p.qry_image], role="query", subset=p.subset)
            (t,) = self.pre.prepare([p.pos], [p.pos_image], role="document", subset=p.subset)
            out.append((q, t, content_id(p.qry, p.qry_image), content_id(p.pos, p.pos_image)))
        return out

    def batch(self, prepared, rows_per_chunk: int) -> dict:
        """``[K, 1, c]`` arrays (one cell: one CPU device). Each side is padded to exactly its own
        longest user segment and image-patch total, as the reference processor pads each call, so
        both frameworks process the same number of (padded) tokens."""
        from g2e_jax.train.batch import BatchShape, build_batch

        n = len(prepared)
        chunks = n // rows_per_chunk
        out = {}
        for s, side in enumerate(("query", "target")):
            rows = [p[s] for p in prepared]
            users = max(len(r.user_ids) for r in rows)
            per_chunk = [
                sum(
                    len(r.patches)
                    for r in rows[k * rows_per_chunk : (k + 1) * rows_per_chunk]
                    if r.patches is not None
                )
                for k in range(chunks)
            ]
            patches = max(per_chunk) or None
            shape = BatchShape(
                chunks=chunks,
                cells=1,
                rows_per_cell=rows_per_chunk,
                users=users,
                patches_per_cell=patches,
                patch_dim=self.pre.config.vision.patch_dim,
            )
            # build_batch pads both sides alike: give it this side's rows on both.
            built = build_batch([(p[s], p[s], p[2], p[3]) for p in prepared], shape, self.pre.pad_id)
            out[side] = built["query"]
            out.update({k: built[k] for k in ("query_ids", "target_ids", "valid")})
        return out

    def step_fn(self, cfg):
        from g2e_jax.train.step import train_step

        graphdef, tx = self.graphdef, self.tx

        def step(params, opt_state, rest, batch, consts):
            return train_step(graphdef, params, rest, opt_state, batch, consts, tx=tx, cfg=cfg)

        return step

    def step_config(self, prepared, grad_cache: bool, remat: str):
        from g2e_jax.train.step import StepConfig

        sizes = [len(r.patches) for p in prepared for r in p[:2] if r.patches is not None]
        # The reference loss is plain cross-entropy: no same-content masking.
        return StepConfig(
            temperature=TEMPERATURE,
            grad_cache=grad_cache,
            remat=remat,
            scan_unroll=self.args.scan_unroll,
            mask_same_target=False,
            mask_same_query=False,
            scheme="gen2embed",
            pad_id=self.pre.pad_id,
            max_patches_per_image=max(sizes) if sizes else None,
        )

    def compile(self, cfg, batch):
        """AOT-compiled step (params and optimizer state donated) and its memory analysis."""
        import jax

        params = self.init_params
        opt_state = jax.eval_shape(self.tx.init, params)
        spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), batch)
        start = time.perf_counter()
        compiled = (
            jax.jit(self.step_fn(cfg), donate_argnums=(0, 1))
            .lower(params, opt_state, self.rest, spec, self.consts)
            .compile()
        )
        seconds = time.perf_counter() - start
        mem = compiled.memory_analysis()
        memory = None
        if mem is not None:
            memory = {
                "temp_mib": mem.temp_size_in_bytes / 2**20,
                "argument_mib": mem.argument_size_in_bytes / 2**20,
                "output_mib": mem.output_size_in_bytes / 2**20,
                "alias_mib": mem.alias_size_in_bytes / 2**20,
            }
            memory["peak_mib"] = memory["temp_mib"] + memory["argument_mib"]
        return compiled, seconds, memory

    def start(self, compiled, batch):
        """A runner of ``compiled`` from the initial params (which stay un-donated)."""
        return JaxRun(self, compiled, batch)


class JaxRun:
    """One compiled step and its own training state."""

    def __init__(self, side: JaxSide, compiled, batch):
        import jax
        import jax.numpy as jnp

        self.side, self.compiled = side, compiled
        self.params = jax.tree.map(jnp.copy, side.init_params)
        self.opt_state = side.tx.init(self.params)
        self.batch = jax.tree.map(jnp.asarray, batch)

    def step(self) -> tuple[float, float]:
        """(loss, seconds) of one step."""
        import jax

        start = time.perf_counter()
        self.params, self.opt_state, metrics = self.compiled(
            self.params, self.opt_state, self.side.rest, self.batch, self.side.consts
        )
        jax.block_until_ready((self.params, self.opt_state, metrics))
        seconds = time.perf_counter() - start
        return float(metrics["loss"]), seconds


# --------------------------------------------------------------------------------------------------
# PyTorch reference


class TorchSide:
    """transformers Qwen2-VL (+ PEFT LoRA or DoRA), the official pipeline's tokenisation, AdamW."""

    def __init__(self, path: Path, adapter: str, args):
        import torch
        from hf_reference import load_hf_model

        from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor

        torch.manual_seed(args.seed)
        model = load_hf_model(path)
        self.lora_init = None
        if adapter in ("lora", "dora"):
            import peft

            peft_config = peft.LoraConfig(
                r=args.rank,
                lora_alpha=args.alpha,
                lora_dropout=0.0,
                target_modules=HF_TARGETS,
                init_lora_weights="gaussian",
                use_dora=adapter == "dora",
            )
            model = peft.get_peft_model(model, peft_config)
            inner = model.base_model.model
            self.lora_init = {
                name.removesuffix(".lora_A"): (
                    m["default"].weight.detach().numpy().copy(),
                    inner.get_submodule(name.removesuffix(".lora_A") + ".lora_B")["default"]
                    .weight.detach()
                    .numpy()
                    .copy(),
                )
                for name, m in inner.named_modules()
                if name.endswith(".lora_A")
            }
            self.backbone = inner.model
        else:
            self.backbone = model.model
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        # make_optimizer(warmup_steps=0), as transformers' linear schedule: lr * (1 - s / TOTAL_STEPS).
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: max(0.0, 1.0 - s / TOTAL_STEPS))
        self.processor = load_hf_processor(path)

    def tokenise(self, pairs: list[Pair]) -> dict:
        """Both sides through the official pipeline's strings and the HF processor, once."""
        import torch
        from hf_reference import official_template
        from PIL import Image

        from g2e_jax.prompts import PAPER_SYSTEM, get_prompt

        prompt = get_prompt("hierarchical")
        out = {}
        for side, role in (("query", "query"), ("target", "document")):
            texts = [(p.qry, p.qry_image) if side == "query" else (p.pos, p.pos_image) for p in pairs]
            roles = [prompt.template_role(role, p.subset) for p in pairs]
            strings = [
                official_template(
                    t, has_image=im is not None, role=r, system=PAPER_SYSTEM, scheme="gen2embed"
                )
                for (t, im), r in zip(texts, roles)
            ]
            images = [Image.open(im).convert("RGB") for _, im in texts if im is not None]
            enc = self.processor(text=strings, images=images or None, padding=True, return_tensors="pt")
            mask = enc["attention_mask"]
            inputs = {
                "input_ids": enc["input_ids"],
                "attention_mask": mask,
                # Gen2Embed's positions for bare <|image_pad|> runs: 0..n-1 over the real tokens.
                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1).contiguous(),
            }
            if images:
                inputs.update(
                    pixel_values=enc["pixel_values"],
                    image_grid_thw=enc["image_grid_thw"],
                    mm_token_type_ids=enc["mm_token_type_ids"],
                )
            out[side] = (inputs, mask.sum(-1) - 1)
            out[side + "_tokens"] = (int(mask.sum()), int(mask.numel()))
            grids = iter(enc["image_grid_thw"].prod(-1).tolist() if images else [])
            out[side + "_patches"] = [next(grids) if im is not None else 0 for _, im in texts]
        out["labels"] = torch.arange(len(pairs))
        return out

    def _embed(self, inputs, last):
        import torch

        hidden = self.backbone(**inputs).last_hidden_state
        pooled = hidden[torch.arange(hidden.shape[0]), last]
        return torch.nn.functional.normalize(pooled, dim=-1)

    def _chunks(self, batch, side: str, size: int):
        """``batch[side]`` split into chunks of ``size`` rows, padding kept, as the grad_cache package
        splits the official run's batch (pixel rows follow their rows' images)."""
        inputs, last = batch[side]
        patches = batch[side + "_patches"]
        pixel_ends = np.cumsum([0, *patches])  # each row's end in pixel_values
        image_ends = np.cumsum([0, *(n > 0 for n in patches)])  # and in image_grid_thw
        for start in range(0, len(last), size):
            stop = min(start + size, len(last))
            part = {k: v[:, start:stop] if k == "position_ids" else v[start:stop] for k, v in inputs.items()
                    if k not in ("pixel_values", "image_grid_thw")}  # fmt: skip
            if "pixel_values" in inputs and image_ends[stop] > image_ends[start]:
                part["pixel_values"] = inputs["pixel_values"][pixel_ends[start] : pixel_ends[stop]]
                part["image_grid_thw"] = inputs["image_grid_thw"][image_ends[start] : image_ends[stop]]
            else:
                part.pop("mm_token_type_ids", None)
            yield part, last[start:stop]

    def step(self, batch, grad_cache: int | None = None) -> float:
        """One optimiser step; ``grad_cache=c``: GradCache as the official run uses it (chunks of c
        rows: every embedding first without gradients, then each chunk again, back-propagating its
        cached embedding gradient)."""
        import torch

        self.opt.zero_grad(set_to_none=True)
        labels = batch["labels"]
        if grad_cache is None:
            q = self._embed(*batch["query"])
            t = self._embed(*batch["target"])
            loss = torch.nn.functional.cross_entropy(q @ t.T / TEMPERATURE, labels)
            loss.backward()
        else:
            with torch.no_grad():
                cached = {side: torch.cat([self._embed(*c) for c in self._chunks(batch, side, grad_cache)])
                          for side in ("query", "target")}  # fmt: skip
            q, t = (cached[side].requires_grad_() for side in ("query", "target"))
            loss = torch.nn.functional.cross_entropy(q @ t.T / TEMPERATURE, labels)
            loss.backward()
            for side, emb in (("query", q), ("target", t)):
                for k, chunk in enumerate(self._chunks(batch, side, grad_cache)):
                    grad = emb.grad[k * grad_cache : (k + 1) * grad_cache]
                    torch.sum(self._embed(*chunk) * grad).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        return float(loss.detach())

    def timed_step(self, batch, grad_cache: int | None = None) -> tuple[float, float]:
        """(loss, seconds) of one step."""
        start = time.perf_counter()
        loss = self.step(batch, grad_cache)
        return loss, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# Driver


def bench_case(name, path, workload, adapter, pairs, pairs_2n, repeats, args, log):
    """One (model, workload, adapter): the reference and g2e_jax (GradCache off and on), step by step
    in turn, so that a varying background load hits every variant alike."""

    def memory_row(grad_cache, chunk, n_pairs, mem):
        return dict(model=name, workload=workload, adapter=adapter, grad_cache=grad_cache, chunk=chunk,
                    pairs=n_pairs, **(mem or {}))  # fmt: skip

    ref = TorchSide(path, adapter, args)
    tb = ref.tokenise(pairs)
    side = JaxSide(path, adapter, ref.lora_init, args)
    if side.trainable != ref.trainable:
        log(f"  WARNING: trainable parameters differ: g2e_jax {side.trainable:,} vs torch {ref.trainable:,}")
    prepared = side.prepare(pairs)
    variants = []
    for grad_cache in args.grad_cache:
        chunk = args.chunk if grad_cache else args.pairs
        cfg = side.step_config(prepared, grad_cache, args.remat)
        batch = side.batch(prepared, chunk)
        compiled, compile_s, mem = side.compile(cfg, batch)
        log(f"  g2e_jax grad_cache={grad_cache}: compiled in {compile_s:.1f} s, {_mib(mem)}")
        variants.append(
            {
                "grad_cache": grad_cache,
                "chunk": chunk,
                "cfg": cfg,
                "batch": batch,
                "mem": mem,
                "compile_s": compile_s,
                "run": side.start(compiled, batch),
                "losses": [],
                "times": [],
            }
        )
    t_losses, t_times, background = [], [], []
    for i in range(1 + repeats):  # step 0: warm-up
        with CpuMeter() as meter:
            loss, seconds = ref.timed_step(tb)
            t_losses.append(loss)
            t_times.append(seconds)
            for v in variants:
                loss, seconds = v["run"].step()
                v["losses"].append(loss)
                v["times"].append(seconds)
        background.append(meter.background_cores)
        bg = "n/a" if meter.background_cores is None else f"{meter.background_cores:.2f}"
        log(
            f"  step {i}: torch {t_times[-1]:.3f} s, "
            + ", ".join(
                f"g2e_jax gc={'on' if v['grad_cache'] else 'off'} {v['times'][-1]:.3f} s" for v in variants
            )
            + f"; other processes kept {bg} cores busy"
        )
    timed_bg = [b for b in background[1:] if b is not None]
    t_tokens = {"query": tb["query_tokens"], "target": tb["target_tokens"]}
    trainable = ref.trainable
    del ref, tb
    gc.collect()

    results, memory = [], []
    torch_s = statistics.median(t_times[1:])
    for v in variants:
        v["run"] = None
        j_losses, j_times, batch = v["losses"], v["times"], v["batch"]
        jax_s = statistics.median(j_times[1:])
        tokens = {
            s: (
                int(batch[s]["user_len"].sum()) + args.pairs * sum(len(c) for c in side.consts[s]),
                args.pairs * (batch[s]["user_ids"].shape[-1] + sum(len(c) for c in side.consts[s])),
            )
            for s in ("query", "target")
        }
        row = {
            "model": name,
            "workload": workload,
            "adapter": adapter,
            "grad_cache": v["grad_cache"],
            "chunk": v["chunk"],
            "remat": v["cfg"].remat,
            "pairs": args.pairs,
            "repeats": repeats,
            "jax_s_per_step": jax_s,
            "torch_s_per_step": torch_s,
            "ratio_torch_over_jax": torch_s / jax_s,
            "jax_pairs_per_s": args.pairs / jax_s,
            "torch_pairs_per_s": args.pairs / torch_s,
            "jax_min_s": min(j_times[1:]),
            "torch_min_s": min(t_times[1:]),
            "ratio_of_min": min(t_times[1:]) / min(j_times[1:]),
            "jax_compile_s": v["compile_s"],
            "jax_step_times": j_times[1:],
            "torch_step_times": t_times[1:],
            "jax_losses": j_losses,
            "torch_losses": t_losses,
            "first_loss_diff": abs(j_losses[0] - t_losses[0]),
            "last_loss_diff": abs(j_losses[-1] - t_losses[-1]),
            "trainable_params": trainable,
            "jax_tokens_real_padded": tokens,
            "torch_tokens_real_padded": t_tokens,
            "background_cores": statistics.mean(timed_bg) if timed_bg else None,
        }
        results.append(row)
        if args.memory:
            memory.append(memory_row(v["grad_cache"], v["chunk"], args.pairs, v["mem"]))
    if args.memory:  # the same step at 2N pairs: compiled only, for its memory analysis
        prepared_2n = side.prepare(pairs_2n)
        for v in variants:
            chunk_2n = args.chunk if v["grad_cache"] else 2 * args.pairs
            cfg_2n = side.step_config(prepared_2n, v["grad_cache"], args.remat)
            _, compile_2n, mem_2n = side.compile(cfg_2n, side.batch(prepared_2n, chunk_2n))
            memory.append(memory_row(v["grad_cache"], chunk_2n, 2 * args.pairs, mem_2n))
            log(
                f"  g2e_jax grad_cache={v['grad_cache']} at 2N={2 * args.pairs}: "
                f"compiled in {compile_2n:.1f} s, {_mib(mem_2n)}"
            )
    del side, variants
    gc.collect()
    return results, memory


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _mib(mem) -> str:
    if not mem:
        return "n/a"
    return f"temp {mem['temp_mib']:.1f} + args {mem['argument_mib']:.1f} = {mem['peak_mib']:.1f} MiB"


def print_tables(results, memory, depth_note):
    head = (
        f"{'model':<24} {'workload':<8} {'adapter':<7} {'gc':<4} {'N':>4} {'jax s/step':>11} "
        f"{'torch s/step':>12} {'torch/jax':>9} {'jax pairs/s':>11} {'torch pairs/s':>13} {'min ratio':>9} "
        f"{'dloss@1':>9} {'bg cores':>8}"
    )
    print("\n" + depth_note)
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['model']:<24} {r['workload']:<8} {r['adapter']:<7} {'on' if r['grad_cache'] else 'off':<4} "
            f"{r['pairs']:>4} {r['jax_s_per_step']:>11.3f} {r['torch_s_per_step']:>12.3f} "
            f"{r['ratio_torch_over_jax']:>9.2f} {r['jax_pairs_per_s']:>11.1f} "
            f"{r['torch_pairs_per_s']:>13.1f} {r['ratio_of_min']:>9.2f} {r['first_loss_diff']:>9.1e} "
            f"{_num(r['background_cores']):>8}"
        )
    print(
        "s/step: median of the timed steps; min ratio: torch/jax of the fastest steps; dloss@1: |loss "
        "difference| at the first step; bg cores: cores other processes kept busy meanwhile (mean over the "
        "timed steps)."
    )
    busy = [r["background_cores"] for r in results if (r["background_cores"] or 0.0) > BUSY_CORES]
    if busy:
        print(
            f"WARNING: other processes kept up to {max(busy):.2f} cores busy during the timed steps: the "
            "times (torch's above all: its OpenMP threads stall when a core is taken) are not those of an "
            "idle machine."
        )
    if memory:
        head = (
            f"{'model':<24} {'workload':<8} {'adapter':<7} {'gc':<4} {'N':>4} {'chunk':>5} "
            f"{'temp MiB':>9} {'args MiB':>9} {'temp+args':>10}"
        )
        print("\ng2e_jax compiled step memory (XLA memory_analysis)")
        print(head)
        print("-" * len(head))
        for m in memory:
            if "temp_mib" not in m:
                continue
            print(
                f"{m['model']:<24} {m['workload']:<8} {m['adapter']:<7} "
                f"{'on' if m['grad_cache'] else 'off':<4} {m['pairs']:>4} {m['chunk']:>5} "
                f"{m['temp_mib']:>9.1f} {m['argument_mib']:>9.1f} {m['peak_mib']:>10.1f}"
            )
    print("\nloss per step (g2e_jax | torch):")
    for r in results:
        j = " ".join(f"{x:.5f}" for x in r["jax_losses"])
        t = " ".join(f"{x:.5f}" for x in r["torch_losses"])
        print(
            f"  {r['model']} {r['workload']} {r['adapter']} gc={'on' if r['grad_cache'] else 'off'}: "
            f"{j} | {t}  (first diff {r['first_loss_diff']:.1e}, last diff {r['last_loss_diff']:.1e})"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only (smoke test)")
    parser.add_argument("--models", default="tiny,2b-width", help="comma list of tiny, 2b-width")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the 2B-width model")
    parser.add_argument("--vision-blocks", type=int, default=1, help="vision blocks of the 2B-width model")
    parser.add_argument("--workloads", default="text,image", help="comma list of text, image")
    parser.add_argument(
        "--text-subsets",
        default="SynT2I",
        help="synthetic subsets of the text workload (image sides replaced by what they show)",
    )
    parser.add_argument(
        "--image-subsets", default="SynI2T,SynT2I", help="synthetic subsets of the image workload"
    )
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--adapter", default="lora", help="lora, dora, full, or several as 'lora,dora,full'")
    parser.add_argument("--grad-cache", default="off,on", help="off, on, or 'off,on'")
    parser.add_argument("--chunk", type=int, default=4, help="GradCache chunk size (pairs)")
    parser.add_argument("--remat", default="none", help="rematerialisation inside each chunk's forward")
    parser.add_argument(
        "--scan-unroll", type=int, default=1, help="layers per iteration of the layer scans (train.scan_unroll)"
    )
    parser.add_argument("--pairs", type=int, default=16, help="batch size N (pairs)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps after the warm-up step")
    parser.add_argument(
        "--repeats-2b", type=int, default=3, help="timed steps for the 2B-width model (~10 s each on 2 cores)"
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=64.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument(
        "--no-memory", dest="memory", action="store_false", help="skip the N / 2N memory compiles"
    )
    parser.add_argument("--workdir", help="where to write the models and data (default: a temporary folder)")
    parser.add_argument("--output", default="bench_train.json")
    args = parser.parse_args()
    args.models = ["tiny"] if args.quick else csv_list(args.models)
    args.workloads = csv_list(args.workloads)
    args.adapter = csv_list(args.adapter)
    args.grad_cache = [{"off": False, "on": True}[v] for v in csv_list(args.grad_cache)]
    if args.pairs % args.chunk:
        parser.error(f"--pairs {args.pairs} is not a multiple of --chunk {args.chunk}")

    sys.path.insert(0, str(REPO / "tests"))  # hf_reference: the official pipeline's PyTorch side
    import jax
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")  # float32 parity (as the tests)
    torch.set_num_threads(args.torch_threads)

    from g2e_jax.data.synthetic import generate_synthetic, make_synthetic
    from g2e_jax.models.qwen2_vl.tiny import make_tiny

    def log(msg):
        print(msg, flush=True)

    log(
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} CPU cores"
    )
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    subsets = {"text": csv_list(args.text_subsets), "image": csv_list(args.image_subsets)}
    rows = max(math.ceil(2 * args.pairs / len(subsets[w])) for w in args.workloads)
    syn = {"train_rows": rows, "eval_queries": 1, "image_size": args.image_size, "seed": args.seed}
    data = make_synthetic(work / "synthetic", **syn)
    truth = generate_synthetic(**syn).truth if "text" in args.workloads else None
    workloads = {
        w: workload_pairs(data, truth, subsets[w], 2 * args.pairs, text_only=w == "text")
        for w in args.workloads
    }

    blocks = f"{args.vision_blocks} vision block(s)"
    depth = f"2b-width = Qwen2-VL-2B widths at {args.layers} decoder layers + {blocks}"
    results, memory = [], []
    try:
        for name in args.models:
            if name == "tiny":
                path = make_tiny(work / "tiny", seed=0)
            elif name == "2b-width":
                path = make_tiny(
                    work / "2b_width", seed=1, config=qwen2_vl_2b_width(args.layers, args.vision_blocks)
                )
            else:
                parser.error(f"unknown model {name!r}")
            label = name if name == "tiny" else f"2b-width-L{args.layers}V{args.vision_blocks}"
            repeats = args.repeats if name == "tiny" else args.repeats_2b
            for workload, pairs in workloads.items():
                for adapter in args.adapter:
                    log(f"{label} / {workload} / {adapter}: {args.pairs} pairs, {repeats} timed steps")
                    r, m = bench_case(
                        label, path, workload, adapter, pairs[: args.pairs], pairs, repeats, args, log
                    )
                    results += r
                    memory += m
                    gc.collect()
    finally:
        if tmp is not None:
            tmp.cleanup()

    print_tables(results, memory, depth if "2b-width" in args.models else "")
    meta = {
        "jax": jax.__version__,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "depth": depth,
        "subsets": subsets,
        "args": {k: v for k, v in vars(args).items()},
    }
    with open(args.output, "w") as f:
        json.dump({"meta": meta, "results": results, "memory": memory}, f, indent=2)
    log(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
