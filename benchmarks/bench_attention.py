"""Shared-prefix attention, forward and forward+backward, against the alternatives.

Providers (each reported as skipped with its reason when it cannot run):
  prefix_kernels   this package (triton on CUDA; torch backend on CPU)
  sdpa_copied      what PEFT on transformers runs today: the prefix expanded to the batch and
                   concatenated, GQA heads repeated, SDPA with a materialised bool mask
  flex_broadcast   FlexAttention twice, merged by log-sum-exp: the prefix as K/V of batch 1
                   broadcast over the requests, the own keys with a causal block mask

Training shapes from the op issue: B=16, Hq=32, Hkv=8, D=128, Lq=Lk=1024, P in {16, 128, 1024},
bf16. Timing: triton.testing.do_bench (CUDA events, median and 20/80 quantiles) on a GPU;
perf_counter medians on a CPU (--smoke, to keep the script from rotting). TFLOP/s counts the
visible score entries only (causal half of the own block) with fwd = 4 * entries * D and
fwd+bwd = 3.5 * fwd, the usual FlashAttention accounting, and is also given as a fraction of the
bf16 matmul rate measured on the same card.

    python benchmarks/bench_attention.py                 # GPU, full shapes
    python benchmarks/bench_attention.py --smoke         # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flex import compiled_flex_attention, timing_passes  # noqa: E402
from rows import Progress, environment  # noqa: E402
from timing import time_ms  # noqa: E402

from prefix_kernels import shared_prefix_attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "attention.jsonl"


def make_inputs(B, Hq, Hkv, L, P, D, dtype, device):
    torch.manual_seed(0)
    q = torch.randn(B, Hq, L, D, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(B, Hkv, L, D, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(B, Hkv, L, D, dtype=dtype, device=device, requires_grad=True)
    pk = torch.randn(1, Hkv, P, D, dtype=dtype, device=device, requires_grad=True)
    pv = torch.randn(1, Hkv, P, D, dtype=dtype, device=device, requires_grad=True)
    return q, k, v, pk, pv


def provider_prefix_kernels(q, k, v, pk, pv):
    return shared_prefix_attention(q, k, v, pk, pv, causal=True)


def provider_sdpa_copied(q, k, v, pk, pv):
    B, Hq, L, D = q.shape
    Hkv, P = k.shape[1], pk.shape[2]
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    values = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    mask = torch.cat([torch.ones(L, P, dtype=torch.bool, device=q.device), causal], dim=1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.expand(B, 1, L, P + L))


@functools.lru_cache(maxsize=None)
def _flex_masks(B: int, L: int, P: int, device: torch.device):
    """Built once per shape, outside the timed step. Flex broadcasts K/V of batch 1 over the
    queries only with a block mask (without one it raises: query and key/value batch sizes
    differ), hence the all-visible one for the prefix."""
    from torch.nn.attention.flex_attention import create_block_mask

    whole = create_block_mask(lambda b, h, qi, ki: ki >= 0, B, None, L, P, device=device)
    causal = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, L, L, device=device)
    return whole, causal


def provider_flex_broadcast(q, k, v, pk, pv):
    flex = compiled_flex_attention()
    B, Hq, L, D = q.shape
    whole, causal = _flex_masks(B, L, pk.shape[2], q.device)
    out_p, lse_p = flex(q, pk, pv, block_mask=whole, enable_gqa=True, return_lse=True)  # pk: batch 1, broadcast
    out_r, lse_r = flex(q, k, v, block_mask=causal, enable_gqa=True, return_lse=True)
    lse = torch.logaddexp(lse_p, lse_r)
    return (torch.exp(lse_p - lse)[..., None] * out_p + torch.exp(lse_r - lse)[..., None] * out_r).to(q.dtype)


PROVIDERS = {
    "prefix_kernels": provider_prefix_kernels,
    "sdpa_copied": provider_sdpa_copied,
    "flex_broadcast": provider_flex_broadcast,
}


def matmul_tflops(device, dtype) -> float | None:
    """Measured dense matmul rate of this card, the yardstick for fractions."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device)[0]
    return 2 * n**3 / (ms * 1e-3) / 1e12


def flops(B, Hq, L, P, D, mode) -> float:
    entries = B * Hq * (L * P + L * (L + 1) / 2)  # visible scores: whole prefix + causal half
    fwd = 4 * entries * D
    return fwd if mode == "fwd" else 3.5 * fwd


def run(shapes, modes, providers, device, dtype, results: Path, smoke: bool = False) -> list[dict]:
    env = environment(device, smoke)
    peak = matmul_tflops(device, dtype)
    progress = Progress(results, len(shapes) * len(modes) * len(providers), "attention")
    for names, (B, Hq, Hkv, L, P, D) in [(n, s) for n in timing_passes(providers) for s in shapes]:
        for mode in modes:
            for name in names:
                shape = dict(B=B, Hq=Hq, Hkv=Hkv, Lq=L, Lk=L, P=P, D=D, G=1, causal=True)
                row = dict(workload="attention", mode=mode, provider=name, shape=shape,
                           dtype=str(dtype).replace("torch.", ""), **env)
                try:
                    q, k, v, pk, pv = make_inputs(B, Hq, Hkv, L, P, D, dtype, device)
                    fn = PROVIDERS[name]
                    if mode == "fwd":
                        def step():
                            with torch.no_grad():
                                fn(q, k, v, pk, pv)
                    else:
                        dout = torch.randn(B, Hq, L, D, dtype=dtype, device=device)

                        def step():
                            out = fn(q, k, v, pk, pv)
                            torch.autograd.grad(out, (q, k, v, pk, pv), dout)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    med, lo, hi = time_ms(step, device)
                    tf = flops(B, Hq, L, P, D, mode) / (med * 1e-3) / 1e12
                    row.update(status="ok", median_ms=med, p20_ms=lo, p80_ms=hi, tflops=tf,
                               frac_matmul=(tf / peak if peak else None), matmul_tflops=peak,
                               peak_mib=(torch.cuda.max_memory_allocated(device) / 2**20
                                         if device.type == "cuda" else None))
                except Exception as exc:  # reported, not dropped
                    row.update(status="skipped", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
                progress.add(row, f"{mode:7s} P={P:5d} {name:15s} " + (
                    f"{row['median_ms']:9.3f} ms {row['tflops']:7.2f} TFLOP/s" if row["status"] == "ok"
                    else f"skipped: {row['reason']}"))
    progress.close()
    return progress.rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON-lines file to upsert rows into")
    ap.add_argument("--providers", nargs="*", default=list(PROVIDERS), choices=list(PROVIDERS))
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        shapes = [(2, 4, 2, 32, P, 32) for P in (4, 16)]
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run with --smoke on a CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = [(16, 32, 8, 1024, P, 128) for P in (16, 128, 1024)]
    return run(shapes, ("fwd", "fwd_bwd"), args.providers, device, dtype, args.out, smoke=args.smoke)


if __name__ == "__main__":
    main()
