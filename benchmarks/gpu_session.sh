#!/usr/bin/env bash
# On a lent GPU machine: the GPU test lane, then the benchmarks, all results under $OUT.
#   run(command="bash benchmarks/gpu_session.sh tests")   then
#   run(command="bash benchmarks/gpu_session.sh bench")   (each call must end within 10 minutes and
#   may bring back at most 8 files, so the phases are separate calls; "all" runs both)
# then copy $OUT/* into benchmarks/results/ and commit them.
set -uo pipefail
PHASE=${1:-all}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
if [ "$PHASE" = tests ] || [ "$PHASE" = all ]; then
  python3 -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
  python3 -m prefix_kernels.cli verify 2>&1 | tee -a "$OUT/tests.log"
fi
if [ "$PHASE" = bench ] || [ "$PHASE" = all ]; then
  # one log for all benchmarks: 7 files in all, within the 8 a call brings back
  python3 benchmarks/bench_attention.py --out "$OUT/attention.jsonl" 2>&1 | tee "$OUT/bench.log"
  python3 benchmarks/bench_train_step.py --out "$OUT/train_step.jsonl" 2>&1 | tee -a "$OUT/bench.log"
  python3 benchmarks/bench_decode.py --out "$OUT/decode.jsonl" 2>&1 | tee -a "$OUT/bench.log"
  python3 benchmarks/bench_generate.py --out "$OUT/generate.jsonl" 2>&1 | tee -a "$OUT/bench.log"
  python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/pytest_benchmark.json" 2>&1 | tail -n 60 | tee -a "$OUT/bench.log"
fi
