"""Write prefix_kernels/data/train_choice.json from bench_attention.py's forward + backward rows.

For every GPU and measured shape (one prefix, no kv_mask) where both the "composed" and the
"triton" training backends ran, the faster of the two (median time); `"auto"` then tries that
one first on CUDA for the nearest shape (prefix_kernels/backends/train_choice.py). Run after
`bench_attention.py` on a GPU, commit both files.

    python benchmarks/train_choice.py [--rows benchmarks/results/attention.jsonl] [--out ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prefix_kernels.backends.train_choice import TABLE  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_choice import write_table  # noqa: E402

PROVIDER = {"prefix_kernels_composed": "composed", "prefix_kernels_triton": "triton"}


def build_table(rows: list[dict]) -> dict:
    """{gpu: [entry]} with one entry per (gpu, shape, dtype) that both backends measured."""
    timed = {}
    for r in rows:
        if (r.get("workload") != "attention" or r.get("mode") != "fwd_bwd" or r.get("status") != "ok"
                or r.get("provider") not in PROVIDER):
            continue
        s = r["shape"]
        if s.get("G", 1) != 1 or s.get("kv_mask"):
            continue
        key = (r["device"], r["dtype"], s["D"], s["B"], s["L"], s["P"])
        timed.setdefault(key, {})[PROVIDER[r["provider"]]] = r["median_ms"]
    table = {}
    for (gpu, dtype, D, B, L, P), ms in sorted(timed.items()):
        if len(ms) == 2:
            table.setdefault(gpu, []).append(dict(dtype=dtype, D=D, B=B, L=L, P=P, faster=min(ms, key=ms.get),
                                                  composed_ms=ms["composed"], triton_ms=ms["triton"]))
    return table


def main(argv=None):
    return write_table(build_table, __doc__, ROOT / "benchmarks" / "results" / "attention.jsonl", TABLE, argv)


if __name__ == "__main__":
    main()
