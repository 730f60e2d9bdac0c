"""``g2e-jax demo``: the whole pipeline, offline, on the tiny model and synthetic data.

Stages run in order and each is a function of the shared ``DemoRun`` (later work slots mining and
fine-tuning in as more stages): make the tiny model, make the synthetic MMEB and SugarCrepe sets,
zero-shot MMEB with the ``plain`` and ``hierarchical`` prompts, SugarCrepe, SaHa mining of the
training subsets, contrastive fine-tuning on the clusters, MMEB again, export the eval corpus
embeddings (fine-tuned model) to numpy, and write ``report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import ml_collections

from g2e_jax.io import write_atomic
from g2e_jax.paths import absolute, relative_to_file


def tiny_training_config() -> ml_collections.ConfigDict:
    """Fine-tuning the tiny model on the synthetic set (the demo; configs/tiny.py returns it)."""
    from g2e_jax.data.synthetic import SUBSETS
    from g2e_jax.train.config import training_config

    c = training_config(subsets=tuple(SUBSETS))
    c.max_len = 256
    c.mine.top_k = 3
    c.mine.pool_mult = 2
    c.mine.classification_subsets = ("SynShape", "SynColor")
    # Mining at the tiny settings on the original rows (the demo's own mining stage does the same).
    c.mine.update(split="original", max_len=256, image_resolution=None)
    t = c.train
    t.steps = 300
    t.clusters_per_batch = 4  # up to 16 pairs
    # Clusters of every subset in one batch, as the paper's run draws them: the demo is the recipe in
    # miniature, and its in-batch vs SaHa comparison only means something with the paper's batches.
    t.batch_subsets = "mixed"
    t.learning_rate = 1e-3
    t.warmup_steps = 5
    t.grad_cache = True
    t.rows_per_cell = 4
    t.users = 160
    t.patches_per_cell = 4 * 36  # four 84 x 84 images
    t.max_patches_per_image = 64
    # One program for every step, fitted to the synthetic rows (user segments of at most 51 and 19
    # tokens where 160 fit): compiling the tiny model's step costs more than padding it, and the
    # padding to 160 took half of each step.
    t.shape_buckets = False
    t.shape_from_data = True
    # The synthetic classification subsets have a handful of labels, so a batch holds many rows
    # sharing a target: keep this project's same-target / same-query masks on (the paper's loss has none).
    t.mask_same_target = True
    t.mask_same_query = True
    t.log_every = 5
    t.checkpoint_every = 20
    c.adapter.kind = "full"  # the tiny model is random: adapt everything
    c.adapter.dropout = 0.0
    return c


def demo_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.arch = "qwen2_vl"  # the tiny model's backbone (a model_type): qwen2_vl, qwen2_5_vl, qwen3_vl or llava_next
    c.seed = 0
    c.synthetic = ml_collections.ConfigDict(
        dict(train_rows=64, eval_queries=24, num_candidates=8, image_size=84)
    )  # fmt: skip
    c.sugarcrepe_items = 6
    c.mine = ml_collections.ConfigDict(dict(top_k=3, pool_mult=2))
    c.train_steps = 300  # fine-tuning steps (the rest: tiny_training_config)
    c.presets = ("plain", "hierarchical")
    c.scheme = "gen2embed"
    c.dtype = "float32"
    c.max_len = 512
    c.batch_size = 8
    return c


@dataclasses.dataclass
class DemoRun:
    workdir: Path
    cfg: ml_collections.ConfigDict
    results: dict = dataclasses.field(default_factory=dict)
    timings: dict = dataclasses.field(default_factory=dict)

    @property
    def model_dir(self) -> Path:
        return self.workdir / "tiny_model"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "synthetic"

    def embedder(self, preset: str):
        from g2e_jax.embed import Embedder

        if "_embedder" not in self.results:
            self.results["_embedder"] = Embedder.from_pretrained(
                self.model_dir, dtype=self.cfg.dtype, scheme=self.cfg.scheme, max_len=self.cfg.max_len,
                batch_size=self.cfg.batch_size, progress=False,
            )  # fmt: skip
        return self.results["_embedder"].with_prompt(preset, scheme=self.cfg.scheme)


def make_tiny_model(run: DemoRun) -> str:
    from g2e_jax.models import make_tiny

    make_tiny(run.model_dir, arch=run.cfg.arch, seed=run.cfg.seed)
    return f"tiny random {run.cfg.arch} in {run.model_dir}"


def make_synthetic_data(run: DemoRun) -> str:
    from g2e_jax.data.synthetic import make_synthetic, make_synthetic_sugarcrepe

    make_synthetic(run.data_dir, seed=run.cfg.seed, **run.cfg.synthetic.to_dict())
    make_synthetic_sugarcrepe(
        run.workdir / "sugarcrepe", seed=run.cfg.seed, items_per_subset=run.cfg.sugarcrepe_items
    )
    return (
        f"synthetic MMEB-format set in {run.data_dir}, SugarCrepe-format set in {run.workdir / 'sugarcrepe'}"
    )


def zero_shot_mmeb(run: DemoRun) -> str:
    from g2e_jax.data.synthetic import SUBSETS
    from g2e_jax.eval.mmeb import evaluate_mmeb, write_report

    runs = {}
    for preset in run.cfg.presets:
        print(f"  prompt preset {preset!r}", flush=True)
        runs[preset] = evaluate_mmeb(
            run.embedder(preset), run.data_dir / "eval", list(SUBSETS), image_dir=run.data_dir / "images",
            groups=SUBSETS, cache_dir=run.workdir / "cache",
        )  # fmt: skip
    run.results["mmeb"] = runs
    write_report(runs, run.workdir / "mmeb")
    return ", ".join(f"{p}: overall {100 * r['summary']['overall']:.1f}" for p, r in runs.items())


def sugarcrepe(run: DemoRun) -> str:
    from g2e_jax.eval.sugarcrepe import evaluate_sugarcrepe, write_sugarcrepe_report

    folder = run.workdir / "sugarcrepe"
    results = evaluate_sugarcrepe(run.embedder("hierarchical"), folder, folder / "images")
    run.results["sugarcrepe"] = results
    write_sugarcrepe_report(results, run.workdir / "sugarcrepe_report")
    return f"average accuracy {100 * results['average']:.1f}"


def saha_mining(run: DemoRun) -> str:
    """SaHa clusters for every synthetic training subset (the classification ones keep retrieval order)."""
    from g2e_jax.data.mmeb import read_train
    from g2e_jax.data.synthetic import SUBSETS
    from g2e_jax.mine import mine_section, mine_subset

    cfg = ml_collections.ConfigDict({"mine": mine_section()})
    cfg.mine.update(top_k=run.cfg.mine.top_k, pool_mult=run.cfg.mine.pool_mult,
                    output_dir=str(run.workdir / "saha"),
                    classification_subsets=tuple(s for s, (cat, _) in SUBSETS.items() if cat == "Classification"))  # fmt: skip
    embedder = run.embedder("hierarchical")
    stats = {}
    for subset in SUBSETS:
        rows = read_train(run.data_dir / "train", subset, image_dir=run.data_dir / "images")
        _, stats[subset] = mine_subset(embedder, rows, subset, cfg, progress=False)
    run.results["saha"] = stats
    total = sum(s["clusters"] for s in stats.values())
    return f"{total} clusters over {len(stats)} subsets in {run.workdir / 'saha'}"


def fine_tune(run: DemoRun) -> str:
    """Contrastive fine-tuning on the mined clusters, on all local devices."""
    import jax

    from g2e_jax.train.trainer import train

    cfg = tiny_training_config()
    cfg.model.path = str(run.model_dir)
    cfg.data.clusters_dir = str(run.workdir / "saha")
    cfg.data.image_dir = str(run.data_dir / "images")
    cfg.train.steps = run.cfg.train_steps
    cfg.train.checkpoint_every = run.cfg.train_steps
    cfg.prompt.scheme = run.cfg.scheme
    last = train(cfg.lock(), run.workdir / "train")
    run.results["train"] = last
    return f"{last['step']} steps on {jax.device_count()} device(s), final loss {last['loss']:.3f}"


def in_batch_fine_tune(run: DemoRun) -> str:
    """The paper's in-batch baseline: plain training rows in random batches (every other row of the
    batch is a negative), as many pairs per batch as a SaHa batch, the same optimiser and steps."""
    from g2e_jax.train.trainer import train

    cfg = tiny_training_config()
    cfg.model.path = str(run.model_dir)
    cfg.data.source = "mmeb"  # each row its own cluster
    cfg.data.root = str(run.data_dir / "train")
    cfg.data.image_dir = str(run.data_dir / "images")
    cfg.train.clusters_per_batch *= run.cfg.mine.top_k + 1  # a SaHa cluster holds up to top_k + 1 rows
    cfg.train.steps = run.cfg.train_steps
    cfg.train.checkpoint_every = run.cfg.train_steps
    cfg.prompt.scheme = run.cfg.scheme
    last = train(cfg.lock(), run.workdir / "train_inbatch")
    run.results["train_inbatch"] = last
    return (
        f"{last['step']} steps of {cfg.train.clusters_per_batch} random rows, final loss {last['loss']:.3f}"
    )


def in_batch_mmeb(run: DemoRun) -> str:
    from g2e_jax.data.synthetic import SUBSETS
    from g2e_jax.embed import Embedder
    from g2e_jax.eval.mmeb import evaluate_mmeb, write_report

    embedder = Embedder.from_pretrained(
        run.workdir / "train_inbatch",
        scheme=run.cfg.scheme,
        max_len=run.cfg.max_len,
        batch_size=run.cfg.batch_size,
        progress=False,
    )
    result = evaluate_mmeb(
        embedder,
        run.data_dir / "eval",
        list(SUBSETS),
        image_dir=run.data_dir / "images",
        groups=SUBSETS,
        cache_dir=run.workdir / "cache",
    )
    run.results["mmeb"]["fine-tuned (in-batch)"] = result
    write_report(run.results["mmeb"], run.workdir / "mmeb")
    return f"overall {100 * result['summary']['overall']:.1f}"


def fine_tuned_mmeb(run: DemoRun) -> str:
    from g2e_jax.data.synthetic import SUBSETS
    from g2e_jax.embed import Embedder
    from g2e_jax.eval.mmeb import evaluate_mmeb, write_report

    embedder = Embedder.from_pretrained(run.workdir / "train", scheme=run.cfg.scheme, max_len=run.cfg.max_len,
                                        batch_size=run.cfg.batch_size, progress=False)  # fmt: skip
    run.results["_tuned"] = embedder
    result = evaluate_mmeb(embedder, run.data_dir / "eval", list(SUBSETS), image_dir=run.data_dir / "images",
                           groups=SUBSETS, cache_dir=run.workdir / "cache")  # fmt: skip
    run.results["mmeb"]["fine-tuned (SaHa)"] = result
    write_report(run.results["mmeb"], run.workdir / "mmeb")
    before = run.results["mmeb"]["hierarchical"]["summary"]["overall"]
    return f"overall {100 * result['summary']['overall']:.1f} (zero-shot hierarchical {100 * before:.1f})"


def export_embeddings(run: DemoRun) -> str:
    """The eval corpus (every distinct candidate of every subset) through `g2e-jax embed`."""
    import shutil

    from g2e_jax.data.mmeb import read_eval
    from g2e_jax.data.synthetic import SUBSETS
    from g2e_jax.export import embed_config, run_embed

    corpus = run.workdir / "corpus.jsonl"
    rows, seen = [], set()
    for subset in SUBSETS:
        for r in read_eval(run.data_dir / "eval", subset, image_dir=run.data_dir / "images"):
            for text, image in zip(r.tgt_texts, r.tgt_images):
                if (text, image) not in seen:
                    seen.add((text, image))
                    # Relative to corpus.jsonl, as `g2e-jax embed` reads it: the demo folder can move.
                    image = None if image is None else relative_to_file(image, corpus)
                    rows.append({"id": f"{subset}/{len(rows)}", "text": text, "image": image})
    write_atomic(corpus, "".join(json.dumps(r) + "\n" for r in rows))
    cfg = embed_config()
    cfg.model.path = str(run.workdir / "train" if (run.workdir / "train").is_dir() else run.model_dir)
    cfg.prompt.scheme, cfg.max_len, cfg.batch_size = run.cfg.scheme, run.cfg.max_len, run.cfg.batch_size
    out = run.workdir / "corpus_embeddings"
    shutil.rmtree(out, ignore_errors=True)
    meta = run_embed(cfg, corpus, out, role="document")
    run.results["export"] = meta
    return f"{meta['rows']} x {meta['dim']} float32 in {out}/embeddings.npy (+ ids.txt, meta.json)"


def write_demo_report(run: DemoRun) -> str:
    from g2e_jax.eval.mmeb import markdown_table

    lines = ["# g2e_jax demo report", "",
             f"A tiny random {run.cfg.arch} model on the synthetic sets: zero-shot numbers of random weights are "
             "near chance;",
             "fine-tuning on the SaHa clusters shows the whole training path working.", ""]  # fmt: skip
    if "mmeb" in run.results:
        lines += ["## MMEB (synthetic subsets), Precision@1 %: zero-shot prompts and fine-tuned", "",
                  markdown_table(run.results["mmeb"]),
                  "![MMEB](mmeb/results.png)", ""]  # fmt: skip
    if "train_inbatch" in run.results and "fine-tuned (SaHa)" in run.results.get("mmeb", {}):
        lines += _baseline_section(run)
    if "train" in run.results:
        lines += ["## Fine-tuning", "", f"{run.results['train']['step']} steps of contrastive fine-tuning on the "
                  f"SaHa clusters; final loss {run.results['train']['loss']:.3f}.", "",
                  "![loss](train/loss.png)", ""]  # fmt: skip
    if "saha" in run.results:
        lines += ["## SaHa mining (zero-shot embeddings, synthetic train subsets)", "",
                  "| Subset | Rows | Clusters | Phase 2 | Sizes | Owners dropped | No owner | R@1 | R@5 | R@10 |",
                  "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for subset, st in run.results["saha"].items():
            sizes = ", ".join(f"{k}:{v}" for k, v in st["size_histogram"].items())
            r = st["recall"]
            lines.append(f"| {subset} | {st['rows']} | {st['clusters']} | {st['phase2_clusters']} | {sizes} | "
                         f"{st['owners_dropped']} | {st['queries_without_owner']} | "
                         + " | ".join(f"{100 * r.get(f'recall@{k}', float('nan')):.1f}" for k in (1, 5, 10)) + " |")  # fmt: skip
        lines.append("")
    if "sugarcrepe" in run.results:
        sc = run.results["sugarcrepe"]
        lines += ["## SugarCrepe (synthetic), accuracy %", "", "| Subset | n | Accuracy |", "|---|---:|---:|"]
        lines += [f"| {s} | {v['n']} | {100 * v['accuracy']:.1f} |" for s, v in sc["subsets"].items()]
        lines += [f"| average | | {100 * sc['average']:.1f} |", ""]
    if "export" in run.results:
        meta = run.results["export"]
        lines += ["## Exported embeddings", "", f"`corpus_embeddings/embeddings.npy`: {meta['rows']} rows, "
                  f"dim {meta['dim']}, prompt {meta['prompt']['name']}, scheme {meta['scheme']}.", ""]  # fmt: skip
    lines += ["## Stage timings", "", "| Stage | Seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in run.timings.items()]
    report = run.workdir / "report.md"
    write_atomic(report, "\n".join(lines) + "\n")
    return str(report)


def _baseline_section(run: DemoRun) -> list[str]:
    """Zero-shot, the in-batch baseline and SaHa side by side (the paper's comparison)."""
    mmeb = run.results["mmeb"]
    categories = list(mmeb["hierarchical"]["summary"]["categories"])
    lines = [
        "## Zero-shot -> in-batch baseline -> SaHa",
        "",
        "Same optimiser, steps and pairs per batch: the in-batch run trains on the plain rows in random",
        "batches, SaHa on the mined clusters. MMEB Precision@1 %:",
        "",
        "| Model | " + " | ".join(categories) + " | IND | OOD | Overall | Final loss |",
        "|---|" + "---:|" * (len(categories) + 4),
    ]
    models = [
        ("zero-shot (hierarchical)", "hierarchical", None),
        ("in-batch", "fine-tuned (in-batch)", run.results["train_inbatch"]["loss"]),
        ("SaHa", "fine-tuned (SaHa)", run.results["train"]["loss"]),
    ]
    for label, name, loss in models:
        summary = mmeb[name]["summary"]
        values = [summary["categories"][c] for c in categories] + [
            summary[k] for k in ("IND", "OOD", "overall")
        ]
        cells = [f"{100 * v:.1f}" for v in values] + ["–" if loss is None else f"{loss:.3f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


STAGES: list[tuple[str, Callable[[DemoRun], str]]] = [
    ("make-tiny", make_tiny_model),
    ("make-synthetic", make_synthetic_data),
    ("zero-shot MMEB", zero_shot_mmeb),
    ("SugarCrepe", sugarcrepe),
    ("SaHa mining", saha_mining),
    ("in-batch fine-tune", in_batch_fine_tune),
    ("in-batch MMEB", in_batch_mmeb),
    ("fine-tune", fine_tune),
    ("fine-tuned MMEB", fine_tuned_mmeb),
    ("export embeddings", export_embeddings),
    ("report", write_demo_report),
]


def run_demo(workdir: str | Path, cfg: ml_collections.ConfigDict | None = None, stages=STAGES) -> DemoRun:
    # Absolute from the start: every path a stage writes into a file is then absolute (g2e_jax.paths).
    run = DemoRun(Path(absolute(workdir)), cfg if cfg is not None else demo_config())
    run.workdir.mkdir(parents=True, exist_ok=True)
    for k, (name, stage) in enumerate(stages, start=1):
        print(f"[demo {k}/{len(stages)}] {name} ...", flush=True)
        start = time.perf_counter()
        summary = stage(run)
        run.timings[name] = time.perf_counter() - start
        print(f"[demo {k}/{len(stages)}] {name}: {summary} ({run.timings[name]:.1f}s)", flush=True)
    return run
