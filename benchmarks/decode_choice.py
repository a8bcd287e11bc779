"""Write prefix_kernels/data/decode_choice.json from bench_decode.py's rows.

For every GPU and measured shape where both the "cuda" and the "triton" decode backends ran,
the faster of the two (median time); `"auto"` then tries that one first for the nearest shape
(prefix_kernels/decode_choice.py). Run after `bench_decode.py` on a GPU, commit both files.

    python benchmarks/decode_choice.py [--rows benchmarks/results/decode.jsonl] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prefix_kernels.backends.decode_choice import TABLE  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import read_rows  # noqa: E402

PROVIDER = {"prefix_kernels_cuda": "cuda", "prefix_kernels_triton": "triton"}


def build_table(rows: list[dict]) -> dict:
    """{gpu: [entry]} with one entry per (gpu, shape, dtype) that both backends measured."""
    timed = {}
    for r in rows:
        if r.get("workload") != "decode" or r.get("status") != "ok" or r.get("provider") not in PROVIDER:
            continue
        s = r["shape"]
        key = (r["device"], r["dtype"], s["D"], s["B"], s["P"], s["T"], s["Lq"])
        timed.setdefault(key, {})[PROVIDER[r["provider"]]] = r["median_ms"]
    table = {}
    for (gpu, dtype, D, B, P, T, Lq), ms in sorted(timed.items()):
        if len(ms) == 2:
            table.setdefault(gpu, []).append(dict(dtype=dtype, D=D, B=B, P=P, T=T, Lq=Lq,
                                                  faster=min(ms, key=ms.get), cuda_ms=ms["cuda"],
                                                  triton_ms=ms["triton"]))
    return table


def write_table(build, doc: str, rows_default: Path, out_default: Path, argv=None) -> dict:
    """The command line of a choice table (this one and train_choice.py's): read --rows (smoke
    rows left out), build, write --out."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=Path, default=rows_default)
    ap.add_argument("--out", type=Path, default=out_default)
    args = ap.parse_args(argv)
    table = build([r for r in read_rows(args.rows) if not r.get("smoke")])
    args.out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    n = sum(len(v) for v in table.values())
    print(f"{n} shapes on {len(table)} GPU(s) -> {args.out}")
    return table


def main(argv=None):
    return write_table(build_table, __doc__, ROOT / "benchmarks" / "results" / "decode.jsonl", TABLE, argv)


if __name__ == "__main__":
    main()
