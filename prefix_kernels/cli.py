"""`prefix-kernels` command line: demo, info, verify and bench."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    from . import cpu_kernel

    why = cpu_kernel.unavailable()  # builds it (about 10 s) if it is not cached yet
    rows.append(("CPU kernel (float32)", "built (one pass: prefix and own keys in one row)" if why is None
                 else f"unavailable, split path used: {why}"))
    from .decode_choice import TABLE, load_table

    measured = load_table()
    rows.append(("decode auto order", (
        f"measured on {', '.join(sorted(measured))} ({sum(map(len, measured.values()))} shapes, {TABLE.name})"
        if measured else "nothing measured yet: cuda, then triton (python benchmarks/decode_choice.py)")))
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


WORKLOADS = ("attention", "decode", "train_step", "generate")


def benchmarks_dir() -> Path:
    """The repository's benchmarks/ folder, next to the package in a checkout (editable install or
    PYTHONPATH); an installed wheel has none."""
    from . import __file__ as package_init

    return Path(package_init).resolve().parents[1] / "benchmarks"


def _shape_summary(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items() if not isinstance(v, bool))


def _rate(row: dict) -> str:
    for field, unit, fmt in (("tokens_per_s", "tok/s", "{:.0f}"), ("tflops", "TFLOP/s", "{:.2f}"),
                             ("gbps", "GB/s", "{:.1f}")):
        if row.get(field) is not None:
            return f"{fmt.format(row[field])} {unit}"
    return "-"


def format_rows(rows: list[dict]) -> str:
    """A readable table of benchmark rows: what ran, how fast, how much memory, or why not."""
    header = ("workload", "mode", "provider", "shape", "median ms", "rate", "peak MiB", "status")
    table = []
    for r in rows:
        ok = r.get("status") == "ok"
        table.append((
            r.get("workload", "?"), str(r.get("mode", "")), r.get("provider", "?"), _shape_summary(r.get("shape", {})),
            f"{r['median_ms']:.3f}" if ok and r.get("median_ms") is not None else "-",
            _rate(r) if ok else "-",
            f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-",
            "ok" if ok else f"{r.get('status', '?')}: {r.get('reason', '')}",
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    widths[-1] = len(header[-1])  # the reason runs on; do not pad to it
    lines = ["  ".join(f"{x:{w}}" for x, w in zip(line, widths)).rstrip() for line in [header, *table]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _bench(args) -> int:
    import importlib
    import os

    import torch

    bench = benchmarks_dir()
    if not all((bench / f"bench_{w}.py").is_file() for w in args.workload):
        print(f"error: prefix-kernels bench runs the benchmark scripts of a repository checkout, and there are "
              f"none at {bench} (an installed wheel does not ship them). Clone the repository and run it from "
              f"there: pip install -e '.[hf,bench]' && prefix-kernels bench", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    smoke = args.quick or not cuda
    if smoke:
        why = "--quick" if args.quick else "no CUDA device here"
        print(f"{why}: running the --smoke variants (tiny shapes on the CPU); these rows are no GPU numbers")
        if not cuda and "prefix_kernels.triton" not in sys.modules:
            os.environ.setdefault("TRITON_INTERPRET", "1")  # triton kernels on CPU tensors, as the tests do
    out = Path(args.out) if args.out is not None else bench / "results"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    written, failed = [], []
    for workload in args.workload:
        target = out / f"{workload}.jsonl"
        print(f"\n== {workload} -> {target}", flush=True)
        try:
            module = importlib.import_module(f"bench_{workload}")
            rows = module.main((["--smoke"] if smoke else []) + ["--out", str(target)])
            written += rows or []
        except (Exception, SystemExit) as exc:  # one workload failing does not stop the others
            failed.append(workload)
            print(f"{workload} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(f"\n{len(written)} rows written under {out}\n")
    print(format_rows(written))
    if args.plot:
        try:
            import plot

            paths = plot.plot_all(out, out / "plots")
        except ImportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print("\nplots:" if paths else "\nno plots: no rows with status ok", *paths, sep="\n  ")
    if failed:
        print(f"\nworkloads that failed to run: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


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
    bench = sub.add_parser("bench", help="run the benchmarks, print their rows, optionally plot them",
                           description="Runs the benchmark scripts of the repository checkout (benchmarks/"
                                       "bench_<workload>.py), which upsert rows (JSON lines) into OUT/<workload>.jsonl, "
                                       "and prints the rows this run wrote. Without a CUDA device, or with --quick, "
                                       "the scripts run their --smoke variants: tiny shapes on the CPU.")
    bench.add_argument("--workload", nargs="+", choices=WORKLOADS, default=list(WORKLOADS),
                       help="which benchmarks to run (default: all)")
    bench.add_argument("--quick", action="store_true", help="the --smoke variants: tiny shapes on the CPU")
    bench.add_argument("--out", type=Path, default=None, help="folder for the rows (default: benchmarks/results)")
    bench.add_argument("--plot", action="store_true", help="then draw the plots into OUT/plots (needs matplotlib)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
