#!/usr/bin/env bash
# CI lane: tests/test_trl.py again on the older supported TRL minor, trl 1.15.0 (the newest, 1.16, is in the
# main environment). trl goes into a --target directory that shadows the main environment through
# PYTHONPATH, without dependencies: its requirements (accelerate, datasets, transformers) are the main
# environment's, which .ci/run sets up first. Needs network access to PyPI only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/trl115.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
python3 -m pip install -q --disable-pip-version-check --no-warn-script-location --no-deps --target "$WORK" "trl==1.15.0"
export PYTHONPATH="$ROOT:$WORK${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import trl; assert trl.__version__ == '1.15.0', trl.__version__; print('trl115: trl', trl.__version__)"
python3 -m pytest tests/test_trl.py -q -p no:cacheprovider
