"""The ``g2e-jax`` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import sys


def _make_tiny(args, overrides) -> int:
    from g2e_jax.models import make_tiny

    path = make_tiny(args.output, arch=args.arch, seed=args.seed)
    print(f"wrote a tiny random {args.arch} model to {path}")
    return 0


def _config(args, overrides, defaults):
    """The --config file with overrides, or the built-in defaults when no file is given; path fields
    made absolute against the working directory here, once (g2e_jax.paths)."""
    from g2e_jax.config_utils import apply_override, load_config
    from g2e_jax.paths import absolute_config_paths

    if args.config is not None:
        return absolute_config_paths(load_config(args.config, overrides))
    cfg = defaults()
    for override in overrides:
        apply_override(cfg, override)
    return absolute_config_paths(cfg.lock())


def _embed(args, overrides) -> int:
    from g2e_jax.export import embed_config, run_embed

    cfg = _config(args, overrides, embed_config)
    meta = run_embed(cfg, args.input, args.output, role=args.role, resume=args.resume, skip_bad=args.skip_bad)
    print(
        f"wrote {meta['rows']} embeddings of dim {meta['dim']} to {args.output} ({meta['skipped']} rows skipped)"
    )
    return 0


def _eval(args, overrides) -> int:
    from g2e_jax.eval.mmeb import eval_config, run_eval

    cfg = _config(args, overrides, eval_config)
    results = run_eval(cfg)
    summary = results["summary"]
    print(f"MMEB Precision@1 over {summary['count']} subsets: overall {100 * summary['overall']:.1f}"
          f" -> {cfg.output_dir}/results.md")  # fmt: skip
    return 0


def _eval_prompts(args, overrides) -> int:
    from g2e_jax.eval.prompt_sweep import run_prompt_sweep, sweep_config

    cfg = _config(args, overrides, sweep_config)
    runs = run_prompt_sweep(cfg)
    scores = ", ".join(f"{name} {100 * r['summary']['overall']:.1f}" for name, r in runs.items())
    print(f"MMEB overall Precision@1 by prompt: {scores} -> {cfg.output_dir}/results.md")
    return 0


def _sugarcrepe_command(benchmark: str):
    def run(args, overrides) -> int:
        from g2e_jax.eval.compositional import BENCHMARKS, run_sugarcrepe, sugarcrepe_config

        cfg = _config(args, overrides, sugarcrepe_config)
        results = run_sugarcrepe(cfg, benchmark)
        average = results["average"]
        scores = (
            f"accuracy {100 * average:.1f}"
            if benchmark == "sugarcrepe"
            else f"image-to-text {average['image_to_text']:.1f}, text-only {average['text_only']:.1f}"
        )
        count = len(results["subsets"])
        print(f"{BENCHMARKS[benchmark]} over {count} subsets: {scores} -> {cfg.output_dir}/results.md")
        return 0

    return run


def _analyze_attention(args, overrides) -> int:
    from g2e_jax.analysis import analysis_config, run_analysis

    cfg = _config(args, overrides, analysis_config)
    result = run_analysis(cfg, args.input, args.output)
    print(f"attention of {len(result['rows'])} rows over {result['layers']} layers -> "
          f"{args.output}/attention.json, attention.png")  # fmt: skip
    return 0


def _mine(args, overrides) -> int:
    from g2e_jax.mine import run_mine

    cfg = _config(args, overrides, None)
    summary = run_mine(cfg)
    print(f"mined {sum(s['clusters'] for s in summary.values())} clusters over {len(summary)} subsets "
          f"-> {cfg.mine.output_dir}")  # fmt: skip
    return 0


def _train(args, overrides) -> int:
    from g2e_jax.train.trainer import train

    cfg = _config(args, overrides, None)
    last = train(cfg, args.workdir)
    if last:
        print(f"trained to step {last['step']}: loss {last['loss']:.4f} -> {args.workdir}")
    return 0


def _check_data(args, overrides) -> int:
    from g2e_jax.config_utils import load_config
    from g2e_jax.check_data import check_data, format_report

    cfg = load_config(args.config, overrides)
    result = check_data(cfg, source=args.source, force=args.force)
    print(format_report(result))
    print(f"(cache: {result['cache']})")
    return 1 if result["bad"] else 0


def _export_hf(args, overrides) -> int:
    from g2e_jax.train.export_hf import export_hf

    path = export_hf(args.checkpoint, args.output, step=args.step, format=args.format)
    merged = args.format == "merged"
    what = "the merged model in Hugging Face layout" if merged else "the adapters as a PEFT folder"
    print(f"wrote {what} to {path}")
    return 0


def _prepare(args, overrides) -> int:
    from g2e_jax.prepare import prepare_config, run_prepare

    cfg = _config(args, overrides, prepare_config)
    path = run_prepare(cfg)
    print(f"wrote a prepared (array_record) training set to {path}")
    return 0


def _make_synthetic(args, overrides) -> int:
    from g2e_jax.data.synthetic import make_synthetic

    path = make_synthetic(args.output, seed=args.seed)
    print(f"wrote a synthetic MMEB-format dataset to {path}")
    return 0


def _demo(args, overrides) -> int:
    from g2e_jax.demo import demo_config, run_demo

    cfg = _config(args, overrides, demo_config)
    run = run_demo(args.workdir, cfg)
    print(f"demo finished: {run.workdir / 'report.md'}")
    return 0


def _compare(args, overrides) -> int:
    from g2e_jax.compare import compare_config, run_compare
    from g2e_jax.compare.reference import TorchMissing

    cfg = _config(args, overrides, compare_config)
    try:
        r = run_compare(
            cfg,
            args.output,
            input_path=args.input,
            role=args.role,
            official_dir=args.official_dir,
            official_clusters=args.official_clusters,
            clusters=args.clusters,
            fail_below=args.fail_below,
        )
    except TorchMissing as e:
        print(f"g2e-jax compare: error: {e}", file=sys.stderr)
        return 2
    if r["rows"]:
        print(
            f"{r['rows']} rows: min cosine {r['min_cosine']}, max abs difference {r['max_abs_diff']} "
            f"-> {args.output}/compare.md"
        )
    if r.get("clusters"):
        print(f"clusters of {len(r['clusters'])} subsets compared -> {args.output}/compare.md")
    if not r["passed"]:
        worst = r["worst"][0]
        print(
            f"g2e-jax compare: {r['failed_rows']} rows below --fail-below {args.fail_below} "
            f"(worst: {worst['id']}, cosine {worst['cosine']})",
            file=sys.stderr,
        )
        return 1
    return 0


def _config_command(sub, name: str, run, help: str, *, config: str, required: bool = False, example: str):
    """A subcommand driven by an ml-collections config: ``--config FILE`` plus ``--config.a.b=v``."""
    parser = sub.add_parser(name, help=help, epilog=f"Config fields can be overridden as --config.a.b=value "
                                                    f"(e.g. {example}).")  # fmt: skip
    parser.add_argument("--config", required=required, help=config)
    parser.set_defaults(run=run, takes_overrides=True)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g2e-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser(
        "make-tiny", help="write a tiny random model (Qwen2-VL by default) in Hugging Face layout"
    )
    tiny.add_argument("--output", required=True, help="directory to write (created if missing)")
    tiny.add_argument("--arch", default="qwen2_vl",
                      help="backbone: a supported Hugging Face model_type: qwen2_vl, qwen2_5_vl, qwen3_vl or llava_next (default %(default)s)")  # fmt: skip
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.set_defaults(run=_make_tiny)

    synthetic = sub.add_parser(
        "make-synthetic", help="write the synthetic MMEB-format dataset (PIL-drawn shapes)"
    )
    synthetic.add_argument("--output", required=True, help="directory to write")
    synthetic.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    synthetic.set_defaults(run=_make_synthetic)

    embed = _config_command(
        sub, "embed", _embed, "embed a JSONL file of rows ({id, text, image}) to embeddings.npy + ids.txt",
        config="config file (default: built-in, as configs/embed.py)", example="--config.model.path=DIR",
    )  # fmt: skip
    embed.add_argument(
        "--input", required=True, help='JSONL rows: {"id": ..., "text": ..., "image": path-or-null}'
    )
    embed.add_argument("--output", required=True, help="output directory")
    embed.add_argument("--role", required=True, choices=("query", "document"))
    embed.add_argument("--resume", action="store_true", help="continue an interrupted export in --output")
    embed.add_argument(
        "--skip-bad", action="store_true", help="write bad rows to skipped.jsonl instead of failing"
    )

    _config_command(
        sub, "eval", _eval, "zero-shot MMEB evaluation (Precision@1 per subset, category, IND/OOD, overall)",
        config="config file (default: built-in, as configs/mmeb_eval.py)", example="--config.data.root=DIR",
    )  # fmt: skip
    _config_command(
        sub,
        "eval-prompts",
        _eval_prompts,
        "prompt ablation: zero-shot MMEB once per prompt preset, one table with a column per preset",
        config="config file (default: built-in, as configs/prompt_ablation.py)",
        example="--config.presets=\"('plain', 'hierarchical')\"",
    )
    sugarcrepe_help = "config file (default: built-in, as configs/sugarcrepe.py)"
    _config_command(
        sub,
        "eval-sugarcrepe",
        _sugarcrepe_command("sugarcrepe"),
        "SugarCrepe: does an image score its caption above a compositional hard negative",
        config=sugarcrepe_help,
        example="--config.data.dir=DIR",
    )
    _config_command(
        sub,
        "eval-sugarcrepe-pp",
        _sugarcrepe_command("sugarcrepe_pp"),
        "SugarCrepe++: image-to-text and text-only accuracy with a paraphrased caption",
        config=sugarcrepe_help,
        example="--config.data.dir=DIR",
    )
    attention = _config_command(
        sub,
        "analyze-attention",
        _analyze_attention,
        "per layer, the attention each prompt segment (system, image, user) receives",
        config="config file (default: built-in, g2e_jax.analysis.analysis_config)",
        example="--config.model.path=DIR",
    )
    attention.add_argument(
        "--input", required=True, help='JSONL rows: {"id": ..., "text": ..., "image": path-or-null}'
    )
    attention.add_argument("--output", required=True, help="output directory (attention.json, attention.png)")
    _config_command(
        sub, "mine", _mine, "SaHa: mine mutually hard clusters per training subset with the zero-shot model",
        config="SaHa config file, e.g. configs/qwen2vl_2b_saha.py", required=True, example="--config.mine.top_k=7",
    )  # fmt: skip
    _config_command(
        sub, "prepare", _prepare, "MMEB-format train set -> TFDS array_record records (tokenised, patchified)",
        config="config file (default: built-in, g2e_jax.prepare.prepare_config)", example="--config.data.root=DIR",
    )  # fmt: skip
    train = _config_command(
        sub, "train", _train, "contrastive fine-tuning (LoRA/DoRA/full) from mined clusters or MMEB rows",
        config="training config, e.g. configs/qwen2vl_2b_saha.py", required=True, example="--config.train.steps=100",
    )  # fmt: skip
    train.add_argument(
        "--workdir", required=True, help="checkpoints, metrics.jsonl, loss.png (resumed if present)"
    )

    check = _config_command(
        sub,
        "check-data",
        _check_data,
        "open every image and validate every row of a config's data; report every bad row",
        config="the train, mine or prepare config whose data to check",
        required=True,
        example="--config.data.check_workers=16",
    )
    check.add_argument(
        "--source",
        choices=("mmeb", "clusters", "prepared"),
        help="what to check (default: the config's data.source, else mmeb)",
    )
    check.add_argument("--force", action="store_true", help="re-check every subset, ignoring the cache")

    export = sub.add_parser("export-hf", help="a training workdir -> merged model in Hugging Face layout")
    export.add_argument("--checkpoint", required=True, help="the `g2e-jax train` workdir")
    export.add_argument(
        "--output", required=True, help="directory to write (weights, config, tokenizer, processor)"
    )
    export.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    export.add_argument("--format", choices=("merged", "peft"), default="merged",
                        help="merged: adapters folded into a full model (default); peft: the LoRA/DoRA "
                        "adapters as a PEFT folder for PeftModel.from_pretrained on the base model")
    export.set_defaults(run=_export_hf)

    demo = _config_command(
        sub, "demo", _demo, "the whole pipeline offline on the tiny model and synthetic data (the README's main job)",
        config="config file (default: built-in, as configs/demo.py)", example="--config.synthetic.eval_queries=8",
    )  # fmt: skip
    demo.add_argument(
        "--workdir", default="g2e_demo", help="where everything is written (default: %(default)s)"
    )

    compare = _config_command(
        sub,
        "compare",
        _compare,
        "g2e_jax's embeddings against the official PyTorch pipeline's, on your model and rows",
        config="config file (default: built-in, as configs/compare.py)",
        example="--config.model.path=DIR",
    )
    compare.add_argument(
        "--output", required=True, help="directory for compare.json, compare.md, compare.png"
    )
    compare.add_argument("--input", help="live mode on JSONL rows ({id, text, image}, as for embed)")
    compare.add_argument("--role", choices=("query", "document"), help="the role of the --input rows")
    compare.add_argument(
        "--official-dir", help="offline mode: the official cli/evaluate.py --encode_output_path"
    )
    compare.add_argument(
        "--official-clusters", help="the official cli/sample_mmeb.py output (*_hard_negatives.json)"
    )
    compare.add_argument("--clusters", help="the `g2e-jax mine` output to compare --official-clusters with")
    compare.add_argument("--fail-below", type=float, help="exit 1 when any row's cosine is below this")
    return parser


def main(argv: list[str] | None = None) -> int:
    from g2e_jax.config_utils import split_config_overrides

    overrides, rest = split_config_overrides(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(rest)
    if overrides and not getattr(args, "takes_overrides", False):
        print(f"g2e-jax {args.command}: error: takes no --config.* overrides", file=sys.stderr)
        return 2
    try:
        from g2e_jax.compile_cache import enable_compile_cache

        enable_compile_cache()  # every program compiled once per machine, not once per start
        return args.run(args, overrides)
    except (ValueError, OSError) as e:
        print(f"g2e-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
