#!/usr/bin/env bash
# On a lent GPU machine: the GPU test lane and the benchmarks, results under $OUT, in three
# phases that each fit one 10-minute call (every step has its own time limit, and the benchmark
# scripts write their rows as they go, so a step cut short keeps what it measured):
#   run(command="PREFIX_KERNELS_COMMIT=<HEAD's short hash> bash benchmarks/gpu_session.sh tests")
#   run(command="PREFIX_KERNELS_COMMIT=<HEAD's short hash> bash benchmarks/gpu_session.sh kernels")
#   run(command="PREFIX_KERNELS_COMMIT=<HEAD's short hash> bash benchmarks/gpu_session.sh e2e")
# (the machine gets the working tree without .git, so the rows take the commit from the
# variable). Then copy $OUT/* into benchmarks/results/ and commit them. At most 8 files come
# back from a call: each phase writes at most 6.
set -uo pipefail
PHASE=${1:-all}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
# SIGINT, so that pytest still prints its summary when a step runs out of time
limit() { timeout -s INT -k 10 "$@"; }

if [ "$PHASE" = tests ] || [ "$PHASE" = all ]; then
  # the GPU lane (realistic sizes, 64-bit offsets, fuzzing), then the triton/decode/cuda tests
  # that the CPU runs under the interpreter, now compiled for the GPU
  limit 330 python3 -m pytest tests -m gpu -q -p no:cacheprovider --maxfail=10 -rs 2>&1 | tee "$OUT/tests.log"
  # (not the offline compile check nor the CUDA kernels' CPU emulation: here the real ones run)
  limit 150 python3 -m pytest tests -m "not gpu" -k "(triton or decode or cuda) and not triton_gpu_compile and not emulated" -q -p no:cacheprovider \
    --maxfail=10 2>&1 | tail -n 40 | tee -a "$OUT/tests.log"
  limit 60 python3 -m prefix_kernels.cli verify 2>&1 | tee -a "$OUT/tests.log"
fi
if [ "$PHASE" = kernels ] || [ "$PHASE" = all ]; then
  limit 200 python3 benchmarks/bench_attention.py --out "$OUT/attention.jsonl" 2>&1 | tee "$OUT/bench.log"
  limit 200 python3 benchmarks/bench_decode.py --out "$OUT/decode.jsonl" 2>&1 | tee -a "$OUT/bench.log"
  # which decode backend "auto" tries first (copy to prefix_kernels/data/decode_choice.json)
  python3 benchmarks/decode_choice.py --rows "$OUT/decode.jsonl" --out "$OUT/decode_choice.json" 2>&1 | tee -a "$OUT/bench.log"
  limit 150 python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/pytest_benchmark.json" 2>&1 | tail -n 60 | tee -a "$OUT/bench.log"
fi
if [ "$PHASE" = e2e ] || [ "$PHASE" = all ]; then
  limit 360 python3 benchmarks/bench_train_step.py --out "$OUT/train_step.jsonl" 2>&1 | tee "$OUT/e2e.log"
  limit 180 python3 benchmarks/bench_generate.py --out "$OUT/generate.jsonl" 2>&1 | tee -a "$OUT/e2e.log"
fi
