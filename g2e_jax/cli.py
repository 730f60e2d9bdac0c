"""The ``g2e-jax`` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import sys


def _make_tiny(args) -> int:
    from g2e_jax.models.qwen2_vl.tiny import make_tiny

    path = make_tiny(args.output, seed=args.seed)
    print(f"wrote a tiny random Qwen2-VL to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g2e-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny", help="write a tiny random Qwen2-VL in Hugging Face layout")
    tiny.add_argument("--output", required=True, help="directory to write (created if missing)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.set_defaults(run=_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as e:
        print(f"g2e-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
