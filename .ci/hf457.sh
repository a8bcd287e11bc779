#!/usr/bin/env bash
# CI lane: tests/test_hf.py tests/test_generate.py on the oldest supported pair, transformers 4.57.6 + peft 0.17.1.
#
# The stack goes into a --target directory that shadows the main environment through PYTHONPATH
# (nothing installed system-wide changes); torch, triton and pytest come from the main environment,
# which .ci/run sets up first. Needs network access to PyPI only.
#   HF457_DIR=/some/dir  keep (and on later runs reuse) the stack there instead of a temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
if [[ -n "${HF457_DIR:-}" ]]; then
    WORK=$HF457_DIR
    mkdir -p "$WORK"
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/hf457.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
fi
SITE=$WORK/site
start=$(date +%s)

pip_target() { python3 -m pip install -q --disable-pip-version-check --no-warn-script-location --target "$SITE" "$@"; }
if [[ -d $SITE/transformers-4.57.6.dist-info && -d $SITE/peft-0.17.1.dist-info && -d $SITE/datasets-4.0.0.dist-info ]]; then
    echo "hf457: reusing $SITE"
else
    # transformers needs no torch: pip resolves its requirements (huggingface_hub < 1.0, tokenizers 0.22, ...).
    pip_target "transformers==4.57.6" "psutil"
    # peft and accelerate require torch: installed without dependencies, or --target would pull in a second
    # torch. Their other requirements (numpy, packaging, psutil, pyyaml, tqdm, safetensors,
    # huggingface_hub) are all in the line above. accelerate 1.15.0: tested with huggingface_hub 0.36.
    pip_target --no-deps "peft==0.17.1" "accelerate==1.15.0"
    # datasets: the main environment's (5.x, from the trl extra) needs huggingface_hub >= 1.0, which
    # transformers 4.57's hub shadows, and Trainer imports it; datasets 4.0.0 works with hub 0.36. Its
    # own requirements (pyarrow, pandas, dill, multiprocess, xxhash, fsspec) come from the main environment.
    pip_target --no-deps "datasets==4.0.0"
fi
installed=$(date +%s)

export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
python3 - "$ROOT" <<'EOF'
import os, sys
import transformers, peft, prefix_kernels
print(f"hf457: transformers {transformers.__version__}, peft {peft.__version__}, prefix_kernels from "
      f"{os.path.dirname(prefix_kernels.__file__)}")
assert transformers.__version__ == "4.57.6" and peft.__version__ == "0.17.1", "wrong stack on the path"
assert os.path.samefile(os.path.dirname(os.path.dirname(prefix_kernels.__file__)), sys.argv[1]), "not this checkout"
EOF
python3 -m pytest tests/test_hf.py tests/test_generate.py -q -p no:cacheprovider
echo "hf457: install $((installed - start)) s, tests $(($(date +%s) - installed)) s"
