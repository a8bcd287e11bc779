"""`prefix-kernels` command line: demo (and, as the suite grows, info / verify / bench)."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.device, args.steps)
    return 0


def _info(args) -> int:
    import platform

    import torch

    from . import __version__
    from .checks import Problem
    from .dispatch import DECODE_REASONS, REASONS

    def version(name):
        try:
            return __import__(name).__version__
        except Exception as exc:  # not installed, or broken
            return f"not available ({type(exc).__name__})"

    rows = [("prefix_kernels", __version__), ("python", platform.python_version()), ("torch", torch.__version__)]
    rows += [(name, version(name)) for name in ("triton", "transformers", "peft")]
    cuda = torch.cuda.is_available()
    rows.append(("device", torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.machine()}), no CUDA device"))
    rows.append(("TRITON_INTERPRET", __import__("os").environ.get("TRITON_INTERPRET", "unset")))
    try:
        from .cuda import build

        rows.append(("CUDA build cache", str(build.cache_root())))
        rows.append(("nvcc", build.find_nvcc() or "not found"))
    except Exception as exc:
        rows.append(("CUDA build cache", f"unavailable ({exc})"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:{width}}  {value}")
    device = torch.device("cuda" if cuda else "cpu")
    print("\nbackends for a bf16 / fp16 / fp32 problem on this device (empty reason: available)")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        p = Problem(B=8, Hq=32, Hkv=8, Lq=512, Lk=512, D=128, G=1, P=64, dtype=dtype, device=device)
        d = Problem(B=8, Hq=32, Hkv=8, Lq=1, Lk=512, D=128, G=1, P=64, dtype=dtype, device=device)
        for path, table, problem in (("train", REASONS, p), ("decode", DECODE_REASONS, d)):
            for name, reasons in table.items():
                why = reasons(problem)
                print(f"  {str(dtype).replace('torch.', ''):9} {path:7} {name:9} {'ok' if not why else '; '.join(why)}")
    return 0


def _verify(args) -> int:
    from .verify import run

    return 0 if run(args.device, quick=args.quick, backends=args.backend) else 1


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
    info = sub.add_parser("info", help="versions, device, which backends can run here and why not",
                          description="Prints versions, the device, the CUDA build cache and nvcc, and for each "
                                      "backend whether it can take a typical problem on this device, or why not.")
    info.set_defaults(func=_info)
    verify = sub.add_parser("verify", help="run every available backend against the float64 reference",
                            description="Runs the op (forward and backward) and the decode path with every backend "
                                        "this machine can run over a sweep of shapes and prints each case's worst "
                                        "error ratio (error / bound, <= 1 passes). Exits 1 on any failure.")
    verify.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    verify.add_argument("--quick", action="store_true", help="a third of the sweep")
    verify.add_argument("--backend", action="append", default=None, help="only this backend (repeatable)")
    verify.set_defaults(func=_verify)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
