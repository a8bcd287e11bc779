"""`prefix-kernels` command line: demo (and, as the suite grows, info / verify / bench)."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.device, args.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefix-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prefix-tune a small Llama-shaped model on table-to-text, stock vs patched",
                          description="Prefix-tunes a Llama-shaped model (random weights, built from a config) on the "
                                      "synthetic E2E-style data shipped with the package, once with stock PEFT + SDPA "
                                      "and once patched, and prints both loss curves, step time and peak memory.")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--steps", type=int, default=None, help="training steps per run (default: 30 on CPU, 40 on GPU)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
