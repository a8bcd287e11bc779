"""One call on a GPU machine: the GPU tests and every benchmark, most valuable first, inside a
time budget, with everything measured left under --out in a few files.

Why one call: the whole session fits a fixed time budget (`--budget`, seconds), so a step that
would overrun it is cut or skipped, and what was measured is kept. For example:

    PREFIX_KERNELS_COMMIT=<HEAD's short hash> python3 benchmarks/gpu_session.py --budget 450

then copy the row files it wrote into benchmarks/results/ and decode_choice.json into
prefix_kernels/data/. Where the checkout has no .git, the rows take their commit from
PREFIX_KERNELS_COMMIT. Steps left undone (skipped for lack of budget, cut at their cap, or failed)
are printed last with the command that runs only them (`--steps a,b --budget S`): run at once on
the same machine, it finds the CUDA build and Triton's compiled kernels still in their caches.

Steps, in this order. Each gets min(its cap, the budget left); one whose turn comes with less than
its floor left is not started. Every benchmark writes its rows as it goes, so a step cut short
keeps what it measured.
  build            the CUDA extension (nvcc, ~30 s for the .cu on one core), in the background from
                   the start, so that the tests and the decode benchmark find it in the cache
  tests_gpu        pytest -m gpu: realistic sizes, 64-bit offsets, the CUDA decode cases on the real
                   build, fuzzing with PREFIX_KERNELS_GPU_EXAMPLES draws; over pytest-xdist workers,
                   so that Triton's compiles (0.5-1 s of CPU each, hundreds of them) run in parallel
  decode           bench_decode.py, issue 4's shapes and providers but the compiling one (Flex)
  decode_choice    decode_choice.py: which decode backend `auto` tries first, from those rows
  generate         bench_generate.py: 64 samples of 256 tokens from a 2048-token prompt, 1B model
  attention        bench_attention.py: training shapes and variants (G > 1, kv_mask), forward and
                   forward+backward, all providers but the compiling one (Flex)
  decode_flex, attention_flex
                   the Flex baselines of those two (`--compiling only`), as steps of their own: each
                   shape's torch.compile is warmed before its timing under a limit of its own
                   (--compile-cap-s, recorded in the rows with compile_s), and the step's cap is
                   sized for the compiles, so that they cut neither the other providers' rows nor
                   their own after the first few shapes
  train_step       bench_train_step.py: a prefix-tuning step on the 1B model, the providers
                   alternated step by step, 20 timed steps each
  shared_prompt    bench_shared_prompt.py: a GRPO/DPO log-prob step on the 1B model, stock against
                   prefix_grouper and prefix_kernels.completion_logits; its rows go into
                   train_step.jsonl (a row's identity includes its workload), as the session may
                   leave no more than 8 files
  info, verify     `prefix-kernels info` and `verify` on the card (issue 5's CLI)
  tests_compiled   the triton/decode/cuda tests that the CPU runs under the interpreter, compiled
  pytest_benchmark pytest benchmarks --benchmark-only, with short rounds
  headline         headline.py: the README's headline table from this session's rows, printed

Files under --out (at most --max-files of them, default 8, each at most --max-file-mib MiB,
default 16, none deeper than 2 folders, names of letters, digits, '.', '_' and '-'; the session
checks this at the end and reports what exceeds it):
  session.json          the GPU, versions, budget, and per step: status, seconds, exit code, the
                        last lines of its output; what is left to do and the command for it
  session.log           every step's whole output, in order
  decode.jsonl generate.jsonl attention.jsonl train_step.jsonl    rows (benchmarks/rows.py;
                        train_step.jsonl holds the shared_prompt rows too)
  decode_choice.json    for prefix_kernels/data/
  pytest_benchmark.json

    python3 benchmarks/gpu_session.py --plan                  # print the plan, run nothing
    python3 benchmarks/gpu_session.py --rehearse --out DIR    # the same steps on a CPU at smoke
                                                              # sizes (tests: collection only)

Wheels in .whl/ at the repository root (git-ignored: `bash benchmarks/gpu_wheels.sh --aot` fills it
on a machine with network access; copy it along with the checkout), when there are any, are
installed first into a --target folder on PYTHONPATH, for a GPU machine without network access:
FlashInfer for bench_decode's flashinfer_cascade provider, with the modules its cascade wrapper
needs compiled ahead of time.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# Defaults of --max-files and --max-file-mib: the most files the session leaves under --out, and
# the largest one; names of letters, digits, '.', '_' and '-', at most 2 folders down.
MAX_FILES = 8
MAX_FILE_MIB = 16
MAX_FILE_BYTES = MAX_FILE_MIB << 20
MAX_DEPTH = 2
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
# GPU fuzzing draws per test and backend in a session (the tests' own defaults, 200 and 150, need
# about a thousand Triton compiles at 1.6 s each: longer than a whole session's budget).
GPU_EXAMPLES = 25
WHEEL_SITE = Path("/tmp/prefix_kernels_site")
COMPILED_TESTS = "(triton or decode or cuda) and not triton_gpu_compile and not emulated"
BUILD_SNIPPET = (
    "from prefix_kernels.backends.cuda.build import ensure_loaded\n"
    "why = ensure_loaded()\n"
    "print('CUDA extension:', why or 'built and loaded')\n"
    "raise SystemExit(1 if why else 0)\n"
)


@dataclass(frozen=True)
class Step:
    name: str
    gpu: tuple            # argv on the GPU; "{out}" becomes the output folder
    cap_s: int            # the most this step may take
    floor_s: int          # with less budget left than this, the step would measure nothing: skip it
    rehearse: tuple = ()  # argv on a CPU (smoke sizes, or collection only); empty: the same as on the GPU
    writes: tuple = ()    # files it leaves under the output folder
    needs: tuple = ()     # files under the output folder it reads
    env: dict = field(default_factory=dict)
    echo_lines: int = 4   # how many of its last lines to print when it ends (the rest is in the log)


def _pytest(*args) -> tuple:
    return (PY, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider", "-rs")


def _bench(script: str, rows: str, *args) -> tuple:
    return (PY, f"benchmarks/{script}", "--out", "{out}/" + rows, *args)


# FlashInfer compiles a module it does not find prebuilt (gpu_wheels.sh --aot) with nvcc: 3.5-4 min
# on 16 cores for the FA3 prefill module (measured 685 s on 2 cores). Inside a step capped at
# 150 s that would leave no decode row at all; refused, its provider is skipped with the reason.
NO_FLASHINFER_JIT = {"FLASHINFER_DISABLE_JIT": "1"}
# Where tune_triton writes its table during a session: not the package's (the steps after it
# measure the default tiles) and not under --out (the table is built from the rows afterwards).
TUNED_SCRATCH = "/tmp/prefix_kernels_triton_tuned.json"
# One Flex compile (a shape, and for attention a mode) at most, outside its timed region; a shape
# past it is skipped with the reason, and the next one tried.
FLEX_COMPILE_CAP_S = 60

BUILD = Step("build", gpu=(PY, "-c", BUILD_SNIPPET),  # waited for at the end, up to the budget's end
             rehearse=(PY, "-c", "print('rehearsal: the CUDA extension is not built on a CPU')"),
             cap_s=0, floor_s=0)

PLAN = (
    Step("tests_gpu", gpu=_pytest("tests", "-m", "gpu", "--maxfail=20", "{xdist}"),
         rehearse=_pytest("tests", "-m", "gpu", "--collect-only"),
         cap_s=170, floor_s=60, env={"PREFIX_KERNELS_GPU_EXAMPLES": str(GPU_EXAMPLES)}),
    Step("decode", gpu=_bench("bench_decode.py", "decode.jsonl", "--compiling", "none"),
         rehearse=_bench("bench_decode.py", "decode.jsonl", "--smoke", "--compiling", "none"),
         cap_s=150, floor_s=40, writes=("decode.jsonl",), env=NO_FLASHINFER_JIT),
    Step("decode_choice",
         gpu=(PY, "benchmarks/decode_choice.py", "--rows", "{out}/decode.jsonl", "--out", "{out}/decode_choice.json"),
         cap_s=30, floor_s=5, writes=("decode_choice.json",), needs=("decode.jsonl",)),
    Step("generate", gpu=_bench("bench_generate.py", "generate.jsonl", "--repeats", "2"),
         rehearse=_bench("bench_generate.py", "generate.jsonl", "--smoke", "--repeats", "1", "--modes", "sample"),
         cap_s=120, floor_s=60, writes=("generate.jsonl",)),
    Step("attention", gpu=_bench("bench_attention.py", "attention.jsonl", "--compiling", "none"),
         rehearse=_bench("bench_attention.py", "attention.jsonl", "--smoke", "--compiling", "none"),
         cap_s=120, floor_s=30, writes=("attention.jsonl",)),
    # the Triton tile candidates the offline compile tables allow, timed (issue 18's autotuning);
    # rows beside attention's (the files under --out are at most 8), the table built afterwards:
    # python benchmarks/tune_triton.py --table-only --rows <out>/attention.jsonl
    Step("tune_triton", gpu=_bench("tune_triton.py", "attention.jsonl", "--table", TUNED_SCRATCH),
         rehearse=_bench("tune_triton.py", "attention.jsonl", "--smoke", "--table", TUNED_SCRATCH),
         cap_s=150, floor_s=60, writes=("attention.jsonl",)),
    # the Flex baselines: one torch.compile per shape (and mode), each warmed outside the timing
    # under FLEX_COMPILE_CAP_S, in steps capped for their compiles
    Step("decode_flex", gpu=_bench("bench_decode.py", "decode.jsonl", "--compiling", "only",
                                   "--compile-cap-s", str(FLEX_COMPILE_CAP_S)),
         rehearse=_bench("bench_decode.py", "decode.jsonl", "--smoke", "--compiling", "only"),
         cap_s=150, floor_s=60, writes=("decode.jsonl",)),
    Step("attention_flex", gpu=_bench("bench_attention.py", "attention.jsonl", "--compiling", "only",
                                      "--compile-cap-s", str(FLEX_COMPILE_CAP_S)),
         rehearse=_bench("bench_attention.py", "attention.jsonl", "--smoke", "--compiling", "only"),
         cap_s=180, floor_s=60, writes=("attention.jsonl",)),
    Step("train_step", gpu=_bench("bench_train_step.py", "train_step.jsonl", "--steps", "20"),
         rehearse=_bench("bench_train_step.py", "train_step.jsonl", "--smoke"),
         cap_s=180, floor_s=60, writes=("train_step.jsonl",)),
    # shared prompts (GRPO G = 8, 16; DPO G = 2): 6 shapes x 3 providers x 12 steps on the 1B model,
    # an fp32 reference forward per shape and the Triton compiles. Rows beside train_step's: the
    # files under --out are at most 8
    Step("shared_prompt", gpu=_bench("bench_shared_prompt.py", "train_step.jsonl", "--steps", "10"),
         rehearse=_bench("bench_shared_prompt.py", "train_step.jsonl", "--smoke"),
         cap_s=180, floor_s=60, writes=("train_step.jsonl",)),
    # issue 5's CLI on the card: what `info` says of the backends there, `verify`'s table
    Step("info", gpu=(PY, "-m", "prefix_kernels.cli", "info"), cap_s=40, floor_s=10, echo_lines=25),
    Step("verify", gpu=(PY, "-m", "prefix_kernels.cli", "verify"),
         rehearse=(PY, "-m", "prefix_kernels.cli", "verify", "--quick", "--backend", "torch"),
         cap_s=90, floor_s=20),
    Step("tests_compiled", gpu=_pytest("tests", "-m", "not gpu", "-k", COMPILED_TESTS, "--maxfail=20", "{xdist}"),
         rehearse=_pytest("tests", "-m", "not gpu", "-k", COMPILED_TESTS, "--collect-only"),
         cap_s=100, floor_s=30),
    Step("pytest_benchmark",
         gpu=_pytest("benchmarks", "--benchmark-only", "--benchmark-max-time=0.05", "--benchmark-min-rounds=3",
                     "--benchmark-json={out}/pytest_benchmark.json"),
         rehearse=_pytest("benchmarks", "--benchmark-only", "-k", "prefix_kernels and not fwd_bwd",
                          "--benchmark-max-time=0.05", "--benchmark-min-rounds=1",
                          "--benchmark-json={out}/pytest_benchmark.json"),
         cap_s=90, floor_s=30, writes=("pytest_benchmark.json",), env=NO_FLASHINFER_JIT),
    # the README's headline table from this session's rows, printed into the call's output
    Step("headline", gpu=(PY, "benchmarks/headline.py", "--results", "{out}"), cap_s=30, floor_s=3, echo_lines=25),
)
STEPS = {s.name: s for s in (BUILD, *PLAN)}
LOG, SUMMARY = "session.log", "session.json"


def files_written(plan=None) -> list[str]:
    """Every file a full session leaves under the output folder (once each: two steps may write
    rows into one file)."""
    return list(dict.fromkeys([SUMMARY, LOG] + [f for s in (PLAN if plan is None else plan) for f in s.writes]))


def xdist_args() -> list[str]:
    """pytest-xdist workers, when it is installed: half the cores, at most 8 (each holds a CUDA
    context, and the GPU lane's 64-bit offset test alone allocates ~15 GB)."""
    if importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]


def argv_for(step: Step, out: Path, rehearse: bool, xdist: list | None = None) -> list[str]:
    argv = []
    for a in (step.rehearse or step.gpu) if rehearse else step.gpu:
        if a == "{xdist}":
            argv += xdist_args() if xdist is None else xdist
        else:
            argv.append(a.replace("{out}", str(out)))
    return argv


def out_folder_problems(out: Path, max_files: int = MAX_FILES, max_file_bytes: int = MAX_FILE_BYTES) -> list[str]:
    """What under `out` exceeds the limits on the files a session leaves: more than `max_files`
    files, a file larger than `max_file_bytes`, deeper than MAX_DEPTH folders, or a name with
    other characters than NAME allows."""
    problems, files = [], []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if not all(NAME.match(part) for part in rel.parts):
            problems.append(f"{rel}: a name with characters other than letters, digits, '.', '_' and '-'")
        if path.is_file():
            files.append(rel)
            if len(rel.parts) - 1 > MAX_DEPTH:
                problems.append(f"{rel}: deeper than {MAX_DEPTH} folders")
            if path.stat().st_size > max_file_bytes:
                problems.append(f"{rel}: larger than {max_file_bytes / (1 << 20):g} MiB")
    if len(files) > max_files:
        problems.append(f"{len(files)} files, more than {max_files}: " + ", ".join(map(str, files)))
    return problems


def gpu_description() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        return subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed: {exc}"


def versions() -> dict:
    found = {"python": sys.version.split()[0]}
    for dist in ("torch", "triton", "transformers", "peft", "flashinfer-python", "pytest-xdist", "hypothesis"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


class Runner:
    """Runs steps as child processes in their own process group; output goes whole to the log
    and its last lines to the summary."""

    def __init__(self, out: Path, env: dict, echo):
        self.env, self.echo = env, echo
        self.log = open(out / LOG, "a", buffering=1)
        self._log_lock = threading.Lock()

    def start(self, step: Step, argv: list[str], buffered: bool = False):
        env = dict(self.env, **step.env)
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        tail: collections.deque = collections.deque(maxlen=25)
        held: list[str] = []

        job = dict(proc=proc, tail=tail, held=held, t0=time.monotonic(), argv=argv)

        def pump():
            for line in proc.stdout:
                tail.append(line.rstrip("\n"))
                if buffered:  # a background step's output goes to the log in one piece, later
                    held.append(line)
                else:
                    with self._log_lock:
                        self.log.write(line)
            proc.wait()
            job["t_end"] = time.monotonic()  # when it ended, not when it was waited for
        job["reader"] = threading.Thread(target=pump, daemon=True)
        job["reader"].start()
        return job

    def finish(self, step: Step, job: dict, seconds: float) -> dict:
        proc, cut = job["proc"], False
        try:
            proc.wait(timeout=max(0.0, seconds))
        except subprocess.TimeoutExpired:
            cut = True
            _signal_group(proc, signal.SIGINT)  # pytest and the benchmarks stop and print what they have
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        job["reader"].join(timeout=10)
        if job["held"]:
            with self._log_lock:
                self.log.write("".join(job["held"]))
        rc = proc.returncode
        status = "cut" if cut else ("ok" if rc == 0 else "failed")
        return dict(step=step.name, status=status, seconds=round(job.get("t_end", time.monotonic()) - job["t0"], 1),
                    returncode=rc, command=" ".join(job["argv"]), tail=list(job["tail"]))

    def header(self, text: str):
        with self._log_lock:
            self.log.write(f"\n===== {text} =====\n")
        self.echo(text)


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def install_wheels(env: dict, echo) -> dict | None:
    """pip-installs .whl/*.whl (carried to a machine without network) into a folder on PYTHONPATH."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        return None
    t0 = time.monotonic()
    cmd = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(WHEEL_SITE), *map(str, wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    aot = sorted((ROOT / ".whl" / "aot").glob("*.so"))
    if done.returncode == 0:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(WHEEL_SITE)) if p)
        # FlashInfer modules compiled ahead of time (gpu_wheels.sh --aot): where FlashInfer looks for
        # AOT modules before it would run nvcc, data/aot/<name>/<name>.so
        for so in aot:
            target = WHEEL_SITE / "flashinfer" / "data" / "aot" / so.stem
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(so, target / so.name)
    echo(f"wheels: {len(wheels)} from .whl -> {WHEEL_SITE}" + (f", {len(aot)} AOT FlashInfer modules" if aot else "")
         + (": installed" if done.returncode == 0 else ": FAILED"))
    return dict(step="wheels", status="ok" if done.returncode == 0 else "failed",
                seconds=round(time.monotonic() - t0, 1), returncode=done.returncode,
                command=" ".join(cmd[:12]) + " ...", tail=(done.stdout + done.stderr).splitlines()[-25:])


def session(args) -> dict:
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in files_written():  # a rerun into the same folder starts clean
        (out / name).unlink(missing_ok=True)
    t_start = time.monotonic()
    deadline = t_start + args.budget
    selected = [s for s in PLAN if s.name in args.steps]
    echo = (lambda text: print(f"[{time.monotonic() - t_start:6.1f}s] {text}", flush=True))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    summary = dict(rehearsal=args.rehearse, budget_s=args.budget, commit=os.environ.get("PREFIX_KERNELS_COMMIT"),
                   gpu=None if args.rehearse else gpu_description(), versions=versions(),
                   gpu_examples=GPU_EXAMPLES, steps=[], left_to_do=[], rerun=None, out_problems=[])

    def save():
        summary["elapsed_s"] = round(time.monotonic() - t_start, 1)
        (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")

    runner = Runner(out, env, echo)
    # (wheels are fetched for the GPU machine's Python, not this one's: a rehearsal leaves them)
    wheels = None if args.rehearse else install_wheels(env, echo)
    if wheels:
        summary["steps"].append(wheels)
    background = None
    if "build" in args.steps:
        runner.header("build (background)")
        background = runner.start(BUILD, argv_for(BUILD, out, args.rehearse), buffered=True)
    save()
    for step in selected:
        left = deadline - time.monotonic()
        missing = [f for f in step.needs if not (out / f).is_file()]
        if missing:
            record = dict(step=step.name, status="skipped", reason=f"needs {', '.join(missing)}, which no step wrote")
        elif left < step.floor_s:
            record = dict(step=step.name, status="skipped",
                          reason=f"budget: {left:.0f} s left, the step needs {step.floor_s} s to measure anything")
        else:
            seconds = min(step.cap_s, left)
            runner.header(f"{step.name}: up to {seconds:.0f} s")
            job = runner.start(step, argv_for(step, out, args.rehearse))
            record = runner.finish(step, job, seconds)
        summary["steps"].append(record)
        echo(f"{step.name}: {record['status']}" + (f" in {record['seconds']} s" if "seconds" in record else "")
             + (f" ({record['reason']})" if "reason" in record else ""))
        for line in record.get("tail", [])[-step.echo_lines:]:
            print(f"    {line}", flush=True)
        save()
    if background is not None:
        build = runner.finish(BUILD, background, max(5.0, deadline - time.monotonic()))
        summary["steps"].insert(1 if wheels else 0, build)
        echo(f"build: {build['status']} ({build['tail'][-1] if build['tail'] else 'no output'})")
    left = [r["step"] for r in summary["steps"] if r["status"] != "ok" and r["step"] in STEPS]
    # A rerun may write into a fresh --out: a step left to do takes along the steps whose files it reads.
    needed = {f for step in PLAN if step.name in left for f in step.needs}
    left = [step.name for step in PLAN if step.name in left or needed & set(step.writes)]
    summary["left_to_do"] = left
    if left:
        steps = ",".join(dict.fromkeys(left))
        summary["rerun"] = (f"python3 benchmarks/gpu_session.py --steps {steps} --budget <seconds>"
                            + (" --rehearse" if args.rehearse else ""))
    summary["out_problems"] = out_folder_problems(out, args.max_files, int(args.max_file_mib * (1 << 20)))
    save()
    runner.log.close()
    _print_table(summary)
    return summary


def _print_table(summary: dict) -> None:
    print(f"\n{'step':18s} {'status':8s} {'seconds':>8s}  last line", flush=True)
    for r in summary["steps"]:
        last = r.get("reason") or (r["tail"][-1] if r.get("tail") else "")
        print(f"{r['step']:18s} {r['status']:8s} {r.get('seconds', 0):8.1f}  {last[:90]}")
    print(f"elapsed {summary['elapsed_s']} s of a {summary['budget_s']} s budget")
    if summary["rerun"]:
        print(f"left to do: {', '.join(summary['left_to_do'])}\n  {summary['rerun']}")
    for problem in summary["out_problems"]:
        print(f"WARNING: over the limits on files under --out: {problem}")


def print_plan(budget: int) -> None:
    print(f"budget {budget} s; build runs in the background from the start until it is done or the budget is spent")
    total = 0
    for s in PLAN:
        total += s.cap_s
        print(f"{s.name:18s} cap {s.cap_s:4d} s  floor {s.floor_s:3d} s  (caps so far {total:4d} s)  "
              + " ".join(argv_for(s, Path("<out>"), False, ["-n", "<workers, with pytest-xdist>"])[1:]))
    print("files: " + " ".join(files_written()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=450, help="seconds for the whole session (default 450)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results" / "gpu"),
                    help="folder for the results (default: the OUT environment variable, or benchmarks/results/gpu)")
    ap.add_argument("--max-files", type=int, default=MAX_FILES,
                    help=f"the most files the session may leave under --out (default {MAX_FILES}); more is reported")
    ap.add_argument("--max-file-mib", type=float, default=MAX_FILE_MIB,
                    help=f"the largest file it may leave there, in MiB (default {MAX_FILE_MIB}); larger is reported")
    ap.add_argument("--steps", default=",".join(STEPS),
                    help="comma-separated steps to run, in plan order (default: all): " + ",".join(STEPS))
    ap.add_argument("--rehearse", action="store_true", help="on a CPU: smoke sizes, tests collected only")
    ap.add_argument("--plan", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        ap.error(f"--steps: unknown {', '.join(unknown)}; known: {', '.join(STEPS)}")
    if args.budget <= 0:
        ap.error("--budget must be a positive number of seconds")
    if args.max_files < 1:
        ap.error("--max-files must be at least 1")
    if args.max_file_mib <= 0:
        ap.error("--max-file-mib must be a positive number of MiB")
    if args.plan:
        print_plan(args.budget)
        return 0
    if not args.rehearse and shutil.which("nvidia-smi") is None:
        ap.error("no nvidia-smi here: this is for a GPU machine (use --rehearse on a CPU)")
    summary = session(args)
    return 0 if not summary["left_to_do"] and not summary["out_problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
