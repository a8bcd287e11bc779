#!/usr/bin/env bash
# Wheels for the flashinfer_cascade provider of benchmarks/bench_decode.py (and the prefix_grouper
# provider of benchmarks/bench_shared_prompt.py) on the GPU box
# (Python 3.12, torch 2.11.0+cu130, nvcc 13.0, no FlashInfer, no network).
# Run from the repo root on a machine that reaches PyPI:   bash benchmarks/gpu_wheels.sh [--aot]
# It fills .whl/ (git-ignored, ~35 MiB). A device run carries it (carry: [".whl"]) and starts with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# flashinfer-python 0.7.0.post1 is the newest release whose wheel fits the 64 MiB carry (0.7.1 and
# later are 59-97 MiB). Its other needs are on the box already or imported only lazily by code paths
# the cascade wrapper does not take (nvidia-cutlass-dsl, cuda-tile, nccl4py, nvidia-cudnn-frontend).
# --aot also compiles here (no GPU needed; ~15 min on 2 cores) the two JIT modules the wrapper loads
# for bf16, D=128 on sm_90a, into .whl/aot/NAME.so. On the device, after the pip install:
#   for f in .whl/aot/*.so; do n=$(basename "$f" .so); mkdir -p /tmp/site/flashinfer/data/aot/$n && cp "$f" /tmp/site/flashinfer/data/aot/$n/; done
# and FlashInfer loads them as AOT modules, without nvcc or ninja.
set -euo pipefail
shopt -s nullglob
cd "$(git rev-parse --show-toplevel)"
FI=0.7.0.post1 TVM=0.1.15.post2
PLAT=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p .whl
# one version of each package in .whl, or the device's pip install stops
find .whl -maxdepth 1 \( -name 'flashinfer_python-*.whl' ! -name "flashinfer_python-$FI-*" \
  -o -name 'apache_tvm_ffi-*.whl' ! -name "apache_tvm_ffi-$TVM-*" \) -print -delete
python3 -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" -d .whl \
  "flashinfer-python==$FI" "apache-tvm-ffi==$TVM"
# bench_shared_prompt.py's Prefix Grouper baseline: pure Python, 17 kB
python3 -m pip download -q --no-deps -d .whl "prefix-grouper==0.0.1.post1"

if [[ ${1:-} == --aot ]]; then
  W=$(mktemp -d /tmp/fi-aot.XXXXXX)
  python3 -m venv --system-site-packages "$W/venv"   # python3 must have torch (a CPU build will do)
  "$W/venv/bin/pip" install -q "apache-tvm-ffi==$TVM" ninja nvidia-ml-py
  "$W/venv/bin/pip" install -q --no-deps --no-compile --target "$W/site" .whl/flashinfer_python-$FI-*.whl
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  if [[ ! -e $CUDA_HOME/include/curand_kernel.h ]]; then   # CUTLASS util headers include it
    python3 -m pip download -q --no-deps -d "$W" nvidia-curand==10.4.5.25
    unzip -q "$W"/nvidia_curand-*.whl 'nvidia/cu13/include/*' -d "$W"
    export FLASHINFER_EXTRA_CUDAFLAGS="-I$W/nvidia/cu13/include"
  fi
  mkdir -p "$W/stub" && echo > "$W/stub/e.c"   # -lcuda needs a libcuda.so to link against
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$W/stub/libcuda.so" "$W/stub/e.c"
  export FLASHINFER_EXTRA_LDFLAGS="-L$W/stub" FLASHINFER_CUDA_ARCH_LIST=9.0 \
    FLASHINFER_WORKSPACE_BASE="$W" MAX_JOBS=$(nproc) PYTHONPATH="$W/site" PATH="$W/venv/bin:$PATH"
  mkdir -p .whl/aot
  "$W/venv/bin/python" - <<'EOF'
import shutil, time, torch
from flashinfer.jit.attention.modules import gen_batch_prefill_module
from flashinfer.jit.cascade import gen_cascade_module
# the modules MultiLevelCascadeAttentionWrapper.plan/run pick on sm_90 for bench_decode's config
args = (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.int32, 128, 128, 0, False, False, False)
for spec in (gen_batch_prefill_module("fa3", *args), gen_cascade_module()):
    t = time.time()
    spec.build()
    shutil.copy(spec.jit_library_path, f".whl/aot/{spec.name}.so")
    print(f"built {spec.name} in {time.time() - t:.0f} s")
EOF
  rm -rf "$W"
fi
ls -l .whl/*.whl .whl/aot/*.so
du -cb .whl/*.whl .whl/aot/*.so | awk 'END {printf "total %.1f MiB\n", $1 / 1048576}'
