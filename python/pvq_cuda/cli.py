"""The `pvq-cuda` command (also `python -m pvq_cuda`)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_demo, run_demo

    if args.cols % 128 or args.rows < 1:
        raise SystemExit("pvq-cuda demo: --cols must be a multiple of 128 and --rows >= 1")
    print(format_demo(run_demo(args.rows, args.cols, args.seed), (args.rows, args.cols)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pvq-cuda", description="Pyramid Vector Quantization for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="PVQ a random Gaussian matrix; SQNR and bpw beside INT3/INT4 RTN")
    demo.add_argument("--rows", type=int, default=4096)
    demo.add_argument("--cols", type=int, default=4096)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
