"""Time the Triton training kernels' tile candidates on this GPU and save the fastest per launch.

For each launch kind (forward, dq, dK/dV), dtype class and head-dim block, every candidate that
the offline compile tables allow on this architecture (prefix_kernels/data/triton_configs.json,
written by benchmarks/triton_configs.py without a GPU) is timed at the training benchmark's
shapes (B = 16, Hq = 32, Hkv = 8, L = 1024, P in {16, 128, 1024}), the other kinds at their
defaults: the forward alone for "forward", the backward for "dq" and "dkdv". Rows go to
benchmarks/results/tune.jsonl; the candidate with the least total time over the shapes becomes
this GPU's entry in prefix_kernels/data/triton_tuned.json, which the launchers read
(tiles.kernel_blocks). Nothing tunes during a user's training step. About two minutes on an H100.

    python benchmarks/tune_triton.py                       # time, then write the table
    python benchmarks/tune_triton.py --table-only --rows benchmarks/results/tune.jsonl
    python benchmarks/tune_triton.py --smoke               # tiny shapes on the CPU (interpreter)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv and not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefix_kernels.backends.triton import tiles  # noqa: E402
from prefix_kernels.backends.triton import train  # noqa: E402
from rows import Progress, environment, read_rows  # noqa: E402
from timing import time_ms  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "tune.jsonl"


def _inputs(B, Hq, Hkv, L, P, D, dtype, device):
    torch.manual_seed(0)
    q = torch.randn(B, L, Hq, D, dtype=dtype, device=device).transpose(1, 2)
    k = torch.randn(B, L, Hkv, D, dtype=dtype, device=device).transpose(1, 2)
    v = torch.randn(B, L, Hkv, D, dtype=dtype, device=device).transpose(1, 2)
    pk = torch.randn(1, Hkv, P, D, dtype=dtype, device=device)
    pv = torch.randn(1, Hkv, P, D, dtype=dtype, device=device)
    return q, k, v, pk, pv


def _step(kind, inputs, D):
    q, k, v, pk, pv = inputs
    scale = D ** -0.5
    out, lse = train.forward(q, k, v, pk, pv, None, None, True, scale)
    if kind == "forward":
        return lambda: train.forward(q, k, v, pk, pv, None, None, True, scale)
    dout = torch.randn_like(out)
    return lambda: train.backward(dout, None, q, k, v, pk, pv, None, None, True, scale, out, lse)


def _config(blocks) -> list:
    return [blocks.m, blocks.n, blocks.warps, blocks.stages]


def _capability(device) -> int:
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def tune(device, dtypes, Ds, shapes, results, smoke=False) -> list:
    default = tiles.kernel_blocks
    env = environment(device, smoke)
    todo = [(dtype, D, kind, c) for dtype in dtypes for D in Ds for kind in tiles.KINDS
            for c in tiles.allowed_candidates(kind, D, dtype, _capability(device))[: 2 if smoke else None]]
    progress = Progress(results, len(todo) * len(shapes), "tune")
    try:
        for dtype, D, kind, config in todo:
            tiles.kernel_blocks = (lambda k, *a, _kind=kind, _c=config: _c if k == _kind else default(k, *a))
            for B, Hq, Hkv, L, P in shapes:
                row = dict(workload="tune", mode=kind, provider="triton", dtype=str(dtype).replace("torch.", ""),
                           shape=dict(B=B, Hq=Hq, Hkv=Hkv, L=L, P=P, D=D, block_d=tiles.block_d(D),
                                      config=_config(config)), **env)
                try:
                    fn = _step(kind, _inputs(B, Hq, Hkv, L, P, D, dtype, device), D)
                    median, p20, p80 = time_ms(fn, device)
                    row.update(status="ok", median_ms=median, p20_ms=p20, p80_ms=p80)
                except Exception as exc:  # a candidate the card rejects at launch: recorded, not fatal
                    row.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
                progress.add(row, f"{kind:8s} {row['dtype']:9s} D={D:3d} P={P:5d} {_config(config)} "
                                  + (f"{row['median_ms']:.3f} ms" if row["status"] == "ok" else row["reason"]))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        tiles.kernel_blocks = default
        progress.close()
    return progress.rows


def build_table(rows: list) -> dict:
    """{gpu: {"<dtype class>/<block_d>/<kind>": [m, n, warps, stages]}}: per GPU and key, the
    config with the least total time among those that ran at every shape timed for that key (a
    config that failed or was cut short at one shape is not chosen)."""
    timed = {}
    for r in rows:
        if r.get("workload") != "tune" or r.get("status") != "ok" or r.get("smoke"):
            continue
        s = r["shape"]
        dtype = getattr(torch, r["dtype"])
        key = f"{tiles.dtype_class(dtype)}/{s['block_d']}/{r['mode']}"
        shape = (s["B"], s["Hq"], s["Hkv"], s["L"], s["P"], s["D"], r["dtype"])
        timed.setdefault(r["device"], {}).setdefault(key, {}).setdefault(tuple(s["config"]), {})[shape] = r["median_ms"]
    table = {}
    for gpu, keys in timed.items():
        for key, configs in keys.items():
            shapes = set.union(*(set(t) for t in configs.values()))
            complete = [c for c, t in configs.items() if set(t) == shapes]
            if not complete:
                continue
            best = min(complete, key=lambda c: sum(configs[c].values()))
            table.setdefault(gpu, {})[key] = list(best)
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--table", type=Path, default=tiles.TUNED)
    ap.add_argument("--table-only", action="store_true", help="build the table from --rows without timing")
    ap.add_argument("--rows", type=Path, default=None, help="rows to build the table from (default: --out)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, two candidates per kind")
    args = ap.parse_args(argv)
    if not args.table_only:
        device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        if args.smoke:
            tune(device, [torch.float16], [64], [(2, 4, 2, 32, 16)], args.out, smoke=True)
        else:
            shapes = [(16, 32, 8, 1024, P) for P in (16, 128, 1024)]
            tune(device, [torch.bfloat16], [64, 128], shapes, args.out)
    table = build_table(read_rows(args.rows or args.out))
    if table:
        merged = dict(tiles.load_json(args.table))
        merged.update(table)
        args.table.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
        print(f"{sum(map(len, table.values()))} entries for {', '.join(table)} -> {args.table}")
    else:
        print("no measured rows: the table is unchanged")
    return table


if __name__ == "__main__":
    main()
