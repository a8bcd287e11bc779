"""Write prefix_kernels/data/triton_configs.json: the Triton tile candidates that compile within
the card's shared memory and without register spills, per architecture (sm_80, sm_90).

Runs tests/triton_offline_compile.py --candidates for both architectures (no GPU needed: the
wheel's own ptxas compiles each candidate) and keeps, per "<dtype class>/<head-dim block>/<kind>",
the candidates that fit, and why the others do not. `benchmarks/tune_triton.py` times only
those on a GPU. Rerun after a kernel or CANDIDATES change (about 2.5 minutes per architecture on
2 cores).

    python benchmarks/triton_configs.py [--out prefix_kernels/data/triton_configs.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "triton_offline_compile.py"
OUT = ROOT / "prefix_kernels" / "data" / "triton_configs.json"
ARCHS = (80, 90)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        procs = {arch: subprocess.Popen([sys.executable, str(SCRIPT), "--arch", str(arch), "--candidates", "--out",
                                         f"{tmp}/{arch}.json"], env=env, stdout=subprocess.DEVNULL)
                 for arch in ARCHS}
        if any(p.wait() for p in procs.values()):
            sys.exit("an offline compile failed")
        results = {arch: json.loads(Path(f"{tmp}/{arch}.json").read_text()) for arch in ARCHS}
    table = {"triton": results[ARCHS[0]]["triton"]}
    for arch, result in results.items():
        table[str(arch)] = result["allowed"]
        table[f"{arch}_rejected"] = result["rejected"]
    args.out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"-> {args.out}: " + ", ".join(f"sm_{a}: {sum(map(len, r['allowed'].values()))} allowed" for a, r in
                                         results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
