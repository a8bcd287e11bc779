"""Runs one benchmark script's main() and writes the rows it returns to a file (JSON).

`prefix-kernels bench` starts this as a child process (python -m prefix_kernels.cli.bench_child
BENCH_DIR WORKLOAD ROWS_FILE ARGS...), so that TRITON_INTERPRET, which Triton reads when a kernel
is decorated, can be set for the child before it imports prefix_kernels.
"""

from __future__ import annotations

import importlib
import json
import sys


def main(argv: list) -> None:
    bench, workload, rows_file, *args = argv
    sys.path.insert(0, bench)
    sys.argv = [f"{bench}/bench_{workload}.py", *args]  # a script may read its flags at import
    rows = importlib.import_module(f"bench_{workload}").main(args)
    with open(rows_file, "w") as f:
        json.dump(rows or [], f)


if __name__ == "__main__":
    main(sys.argv[1:])
