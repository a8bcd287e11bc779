"""`prefix-kernels` command line: demo, info, verify and bench."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import prefix_kernels

from .. import jit
from .._core import env
from .._core.problem import Problem
from ..backends import decode_choice, registry, train_choice
from ..backends import cpu_kernel
from ..backends.cuda import build as cuda_build
from . import demo, demo_grpo, verify

PACKAGE_ROOT = Path(prefix_kernels.__file__).resolve().parent

# The backends `verify` checks (verify.BACKENDS; a test keeps the two equal).
VERIFY_BACKENDS = ("cuda", "triton", "torch", "composed")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (0 or a negative count would run nothing, or crash later)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive int"  # argparse names the type in its error message


def device_arg(text: str) -> str:
    """argparse type: cpu, or cuda / cuda:N where this machine has that CUDA device.

    Checked before any work: an unknown or absent device otherwise surfaces as a traceback from
    deep inside the run (or, in the demo, from a child process)."""
    import torch

    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return text
    if kind != "cuda" or (index and not index.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu or cuda (cuda:N)")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device here (torch.cuda.is_available() is False)")
    if index and int(index) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def out_dir(text: str) -> Path:
    """argparse type for bench --out: not a file (a folder is made in `_bench`, before anything runs)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return path


def _make_out(args, smoke: bool) -> Path:
    """bench's output folder, created before the first case is measured: a bad --out found after
    minutes of measuring loses them. Smoke rows go to results/smoke by default: they are marked
    and never plotted, but need not sit in the measured rows' files."""
    default = benchmarks_dir() / "results"
    out = args.out if args.out is not None else (default / "smoke" if smoke else default)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as exc:
        args.error(f"argument --out: cannot write rows into {out}: {exc}")  # exits 2, as argparse does
    return out


def _demo(args) -> int:

    try:
        (demo_grpo if args.task == "grpo" else demo).run_demo(args.device, args.steps)
    except demo.ChildRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _environment_rows(environ=None) -> list:
    """One row per PREFIX_KERNELS_* variable that is set: its value and effect, or that nothing
    reads it (a misspelt name is otherwise silently without effect)."""
    environ = os.environ if environ is None else environ
    rows = []
    for name in sorted(n for n in environ if n.startswith("PREFIX_KERNEL")):
        effect = env.DESCRIPTIONS.get(name, "not read by prefix_kernels: misspelt? known: " + ", ".join(env.DESCRIPTIONS))
        rows.append((name, f"{environ[name]!r} ({effect})"))
    return rows


def _info(args) -> int:
    import platform

    import torch


    def version(name):
        try:
            return __import__(name).__version__
        except Exception as exc:  # not installed, or broken
            return f"not available ({type(exc).__name__})"

    rows = [("prefix_kernels", prefix_kernels.__version__), ("python", platform.python_version()), ("torch", torch.__version__)]
    rows += [(name, version(name)) for name in ("triton", "transformers", "peft")]
    cuda = torch.cuda.is_available()
    rows.append(("device", torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.machine()}), no CUDA device"))
    rows.append(("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")))
    rows.append(("build cache", str(jit.cache_root())))
    rows.append(("nvcc", cuda_build.find_nvcc() or "not found"))
    why = cpu_kernel.unavailable()  # builds it (about 10 s) if it is not cached yet
    rows.append(("CPU kernel (float32)", "built (one pass: prefix and own keys in one row)" if why is None
                 else f"unavailable, split path used: {why}"))
    measured = decode_choice.load_table()
    rows.append(("decode auto order", (
        f"measured on {', '.join(sorted(measured))} ({sum(map(len, measured.values()))} shapes, {decode_choice.TABLE.name})"
        if measured else "nothing measured yet: cuda, then triton (python benchmarks/decode_choice.py)")))
    trained = train_choice.load_table()
    rows.append(("train auto order (CUDA)", (
        f"measured on {', '.join(sorted(trained))} ({sum(map(len, trained.values()))} shapes, {train_choice.TABLE.name})"
        if trained else "nothing measured yet: composed, then triton (python benchmarks/train_choice.py)")))
    rows += _environment_rows()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:{width}}  {value}")
    device = torch.device("cuda" if cuda else "cpu")
    print("\nbackends for a bf16 / fp16 / fp32 problem on this device (empty reason: available)")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        p = Problem(B=8, Hq=32, Hkv=8, Lq=512, Lk=512, D=128, G=1, P=64, dtype=dtype, device=device)
        d = Problem(B=8, Hq=32, Hkv=8, Lq=1, Lk=512, D=128, G=1, P=64, dtype=dtype, device=device)
        for path, table, problem in (("train", registry.reasons_table(False), p),
                                     ("decode", registry.reasons_table(True), d)):
            for name, reasons in table.items():
                why = reasons(problem)
                print(f"  {str(dtype).replace('torch.', ''):9} {path:7} {name:9} {'ok' if not why else '; '.join(why)}")
    return 0


def _verify(args) -> int:
    return 0 if verify.run(args.device, quick=args.quick, backends=args.backend) else 1


WORKLOADS = ("attention", "decode", "train_step", "generate", "shared_prompt")


def benchmarks_dir() -> Path:
    """The repository's benchmarks/ folder, next to the package in a checkout (editable install or
    PYTHONPATH); an installed wheel has none."""
    return PACKAGE_ROOT.parent / "benchmarks"


def _shape_summary(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items() if not isinstance(v, bool))


def _number(x: float) -> str:
    """Three significant digits, without exponents for large values: a smoke run's 0.004 GB/s
    must not print as 0.0, nor 12345 tok/s as 1.23e+04."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _ms(x: float) -> str:
    return f"{x:.3f}" if abs(x) >= 0.001 else f"{x:.3g}"  # 0.000 would read as nothing measured


def _rate(row: dict) -> str:
    for field, unit in (("tokens_per_s", "tok/s"), ("tflops", "TFLOP/s"), ("gbps", "GB/s")):
        if row.get(field) is not None:
            return f"{_number(row[field])} {unit}"
    return "-"


REASON_WIDTH = 120


def _first_line(reason) -> str:
    """A skip reason's first line, cut to REASON_WIDTH: an InductorError's many lines (or a long
    one) would break the table."""
    lines = str(reason).strip().splitlines()
    line = lines[0] if lines else ""
    more = len(lines) > 1 or len(line) > REASON_WIDTH
    return line[:REASON_WIDTH - 4].rstrip() + " ..." if more else line


# A smoke row ran tiny shapes, on a CPU with the Triton kernels interpreted: interpreted Triton
# against compiled ATen reads as 2-50x slower, which says nothing about either on a GPU.
SMOKE_OK = "ran (smoke: checks the script, not a speed)"
SMOKE_NOTE = ("smoke rows: tiny shapes, the Triton kernels interpreted on a CPU; they check that each benchmark "
              "script runs, and their times are not speeds")


def format_rows(rows: list[dict]) -> str:
    """A readable table of benchmark rows: what ran, how fast, how much memory, or why not."""
    header = ("workload", "mode", "provider", "shape", "median ms", "rate", "peak MiB", "status")
    table = []
    for r in rows:
        ok = r.get("status") == "ok"
        table.append((
            r.get("workload", "?"), str(r.get("mode", "")), r.get("provider", "?"), _shape_summary(r.get("shape", {})),
            _ms(r["median_ms"]) if ok and r.get("median_ms") is not None else "-",
            _rate(r) if ok else "-",
            _number(r["peak_mib"]) if r.get("peak_mib") is not None else "-",
            (SMOKE_OK if r.get("smoke") else "ok") if ok else f"{r.get('status', '?')}: {_first_line(r.get('reason', ''))}",
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    widths[-1] = len(header[-1])  # the reason runs on; do not pad to it
    lines = ["  ".join(f"{x:{w}}" for x, w in zip(line, widths)).rstrip() for line in [header, *table]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _child_env(interpret: bool) -> dict:
    """This process's environment, plus this package first on the path (the child must import
    the same prefix_kernels) and, on a CPU, the Triton interpreter."""
    child = dict(os.environ)
    root = str(PACKAGE_ROOT.parent)
    child["PYTHONPATH"] = os.pathsep.join([root] + ([child["PYTHONPATH"]] if child.get("PYTHONPATH") else []))
    if interpret:
        child.setdefault("TRITON_INTERPRET", "1")
    return child


def run_workload(bench: Path, workload: str, argv: list, interpret: bool) -> list:
    """One benchmark script, in a child process; the rows it wrote.

    A child, because Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when
    prefix_kernels is imported, and this process (`python -m prefix_kernels.cli`, or the
    console script) has imported it already: set here, the variable would come too late and
    the triton provider would be skipped on every CPU."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.json"
        done = subprocess.run([sys.executable, "-m", "prefix_kernels.cli.bench_child", str(bench), workload,
                               str(rows_file), *argv],
                              check=False, env=_child_env(interpret))
        if done.returncode != 0 or not rows_file.is_file():
            raise RuntimeError(f"bench_{workload}.py exited with code {done.returncode} (its output is above)")
        return json.loads(rows_file.read_text())


def _bench(args) -> int:
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
    out = _make_out(args, smoke)
    written, failed = [], []
    for workload in args.workload:
        target = out / f"{workload}.jsonl"
        print(f"\n== {workload} -> {target}", flush=True)  # flushed: the child's lines follow it
        try:
            written += run_workload(bench, workload, (["--smoke"] if smoke else []) + ["--out", str(target)],
                                    interpret=smoke and not cuda)  # triton kernels on CPU tensors, as the tests do
        except Exception as exc:  # one workload failing does not stop the others
            failed.append(workload)
            print(f"{workload} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(f"\n{len(written)} rows written under {out}\n")
    if any(r.get("smoke") for r in written):
        print(SMOKE_NOTE + "\n")
    print(format_rows(written))
    if args.plot:
        if str(bench) not in sys.path:
            sys.path.insert(0, str(bench))
        try:
            import plot

            paths = plot.plot_all(out, out / "plots")
        except ImportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        nothing = getattr(plot, "NOTHING_TO_DRAW", "no rows with status ok")  # smoke rows are never drawn
        print("\nplots:" if paths else f"\nno plots: {nothing}", *paths, sep="\n  ")
    if failed:
        print(f"\nworkloads that failed to run: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefix-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prefix-tuning (or --task grpo) on a small Llama-shaped model, stock vs patched",
                          description="Prefix-tunes a Llama-shaped model (random weights, built from a config) on the "
                                      "synthetic E2E-style data shipped with the package, once with stock PEFT + SDPA "
                                      "and once patched, and prints both loss curves, step time and peak memory. "
                                      "--task grpo: a GRPO-style policy-gradient run on few-shot prompts of the same "
                                      "data, 8 completions per prompt, stock concatenated rows against "
                                      "prefix_kernels.completion_logits (each prompt once).")
    demo.add_argument("--device", type=device_arg, default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--steps", type=positive_int, default=None,
                      help="training steps per run (default: 30 on CPU, 40 on GPU; --task grpo: 12 and 20)")
    demo.add_argument("--task", choices=("prefix", "grpo"), default="prefix",
                      help="prefix: PEFT prefix-tuning (default); grpo: shared-prompt policy gradient")
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="versions, device, which backends can run here and why not",
                          description="Prints versions, the device, the CUDA build cache and nvcc, and for each "
                                      "backend whether it can take a typical problem on this device, or why not.")
    info.set_defaults(func=_info)
    verify = sub.add_parser("verify", help="run every available backend against the float64 reference",
                            description="Runs the op (forward and backward) and the decode path with every backend "
                                        "this machine can run over a sweep of shapes and prints each case's worst "
                                        "error ratio (error / bound, <= 1 passes). Exits 1 on any failure.")
    verify.add_argument("--device", type=device_arg, default=None, help="cpu or cuda (default: cuda if available)")
    verify.add_argument("--quick", action="store_true", help="a third of the sweep")
    verify.add_argument("--backend", action="append", default=None, choices=VERIFY_BACKENDS,
                        help="only this backend (repeatable; default: every one, each that cannot run here "
                             "reported as skipped with its reason)")
    verify.set_defaults(func=_verify)
    bench = sub.add_parser("bench", help="run the benchmarks, print their rows, optionally plot them",
                           description="Runs the benchmark scripts of the repository checkout (benchmarks/"
                                       "bench_<workload>.py), which upsert rows (JSON lines) into OUT/<workload>.jsonl, "
                                       "and prints the rows this run wrote. Without a CUDA device, or with --quick, "
                                       "the scripts run their --smoke variants: tiny shapes on the CPU.")
    bench.add_argument("--workload", nargs="+", choices=WORKLOADS, default=list(WORKLOADS),
                       help="which benchmarks to run (default: all)")
    bench.add_argument("--quick", action="store_true", help="the --smoke variants: tiny shapes on the CPU")
    bench.add_argument("--out", type=out_dir, default=None, help="folder for the rows (default: benchmarks/results; smoke runs: benchmarks/results/smoke)")
    bench.add_argument("--plot", action="store_true", help="then draw the plots into OUT/plots (needs matplotlib)")
    bench.set_defaults(func=_bench, error=bench.error)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
