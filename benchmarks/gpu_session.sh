#!/usr/bin/env bash
# One call on a lent GPU machine: the GPU test lane, then the benchmarks, all results under $OUT.
#   run(command="bash benchmarks/gpu_session.sh")   then copy $OUT/* into benchmarks/results/
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
python3 benchmarks/bench_attention.py --out "$OUT/attention.jsonl" 2>&1 | tee "$OUT/bench.log"
python3 benchmarks/bench_train_step.py --out "$OUT/train_step.jsonl" 2>&1 | tee -a "$OUT/bench.log"
python3 benchmarks/bench_decode.py --out "$OUT/decode.jsonl" 2>&1 | tee "$OUT/bench_decode.log"
python3 benchmarks/bench_generate.py --out "$OUT/generate.jsonl" 2>&1 | tee "$OUT/bench_generate.log"
