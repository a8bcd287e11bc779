"""Shared-prefix attention, forward and forward+backward, against the alternatives.

Providers (each reported as skipped with its reason when it cannot run):
  prefix_kernels   this package, backend="auto": what a user gets (on CUDA, whichever of composed
                   and triton train_choice.json says is faster for the shape, composed before any
                   GPU has measured; the torch backend on a CPU)
  prefix_kernels_triton
                   this package, backend="triton" (the Triton kernels; on a CPU under the
                   interpreter with --smoke)
  prefix_kernels_composed
                   this package, backend="composed": vendor attention kernels (FlashAttention,
                   cuDNN, SDPA) for the prefix part and the own part, merged by log-sum-exp;
                   skipped with the reason where that backend is unknown or declines the case
  prefix_kernels_composed_cudnn
                   the same with cuDNN's kernel tried first (PREFIX_KERNELS_COMPOSED_KERNELS)
  sdpa_copied      what PEFT on transformers runs today: each request's prefix copied in front of
                   its keys, GQA heads repeated, SDPA with a bool mask. The mask is built once
                   per forward, as transformers builds it (not per layer), so outside the timed
                   call; the SDPA backend is chosen once and pinned (sdpa.py), named in the row
  flex_broadcast   FlexAttention twice, merged by log-sum-exp, the whole provider (both calls and
                   the merge) compiled as one: the prefixes as K/V of batch 1 broadcast over the
                   requests (several prefixes laid end to end, each request masked to its own),
                   then the own keys with a causal (and padding) block mask. Block masks built
                   outside the timed call; compiled before it, under its own time limit
                   (--compile-cap-s), the compile's seconds in the row (compile_s)

Training shapes from the op issue: B=16, Hq=32, Hkv=8, D=128, Lq=Lk=1024, bf16, P in {16, 128,
1024} with one prefix and no padding ("base"), and at P = 128 the variants the package's other
paths take (--variants): "G", G = 4 prefixes with a prefix_index, requests sorted by prefix (B/G
each); "kv_mask", right padding of (b mod 4) * max(1, L/128) keys for request b (the
end-to-end path passes a kv_mask); "G_kv_mask", both. Rows carry G and kv_mask in the shape
(and L = Lq = Lk). benchmarks/train_choice.py reads the fwd_bwd rows of prefix_kernels_triton
and prefix_kernels_composed at one prefix without kv_mask.

Timing: triton.testing.do_bench (CUDA events, median and 20/80 quantiles) on a GPU; perf_counter
medians on a CPU (--smoke, to keep the script from rotting; base variant only unless
--variants says more). TFLOP/s counts the visible score entries only (the whole prefix, the
causal half of the own block less padded keys) with fwd = 4 * entries * D and fwd+bwd = 3.5 *
fwd, the usual FlashAttention accounting, and is also given as a fraction of the bf16 matmul rate
measured on the same card.

    python benchmarks/bench_attention.py                    # GPU, full shapes
    python benchmarks/bench_attention.py --compiling none   # GPU, all but the Flex provider
    python benchmarks/bench_attention.py --smoke            # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before prefix_kernels imports triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flex  # noqa: E402
import sdpa  # noqa: E402
from flex import compiled_flex_attention, flex_with_lse, lse_merge, timing_passes  # noqa: E402
from rows import Progress, environment  # noqa: E402
from timing import time_ms, warm  # noqa: E402

from prefix_kernels import shared_prefix_attention  # noqa: E402
from prefix_kernels._core import env  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "attention.jsonl"
COMPILE_CAP_S = 120.0  # default --compile-cap-s: one Flex compile (a shape and mode) at most

# name: (G, kv_mask). G prefixes need B divisible by G (requests sorted by prefix, B/G each).
VARIANTS = {"base": (1, False), "G": (4, False), "kv_mask": (1, True), "G_kv_mask": (4, True)}


@dataclass(frozen=True)
class Case:
    variant: str
    B: int
    Hq: int
    Hkv: int
    L: int
    P: int
    D: int
    G: int = 1
    kv_mask: bool = False

    def shape(self) -> dict:
        return dict(B=self.B, Hq=self.Hq, Hkv=self.Hkv, L=self.L, Lq=self.L, Lk=self.L, P=self.P, D=self.D,
                    G=self.G, causal=True, kv_mask=self.kv_mask)


def case(variant: str, B, Hq, Hkv, L, P, D) -> Case:
    G, masked = VARIANTS[variant]
    return Case(variant, B, Hq, Hkv, L, P, D, G=min(G, B), kv_mask=masked)


def make_inputs(B, Hq, Hkv, L, P, D, dtype, device, G=1):
    torch.manual_seed(0)
    q = torch.randn(B, Hq, L, D, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(B, Hkv, L, D, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(B, Hkv, L, D, dtype=dtype, device=device, requires_grad=True)
    pk = torch.randn(G, Hkv, P, D, dtype=dtype, device=device, requires_grad=True)
    pv = torch.randn(G, Hkv, P, D, dtype=dtype, device=device, requires_grad=True)
    return q, k, v, pk, pv


def prefix_index_of(B: int, G: int, device) -> torch.Tensor | None:
    """Requests sorted by prefix, B // G each (None for one prefix, as a caller would pass it)."""
    return None if G == 1 else (torch.arange(B, device=device) * G // B).to(torch.int32)


def padding_of(B: int, L: int) -> list[int]:
    """Right padding of request b: (b mod 4) * max(1, L // 128) keys (0 for every fourth request)."""
    return [(b % 4) * max(1, L // 128) for b in range(B)]


def kv_mask_of(B: int, L: int, device) -> torch.Tensor:
    """(B, L) bool, True on each request's own keys, False on its right padding."""
    valid = torch.tensor([L - pad for pad in padding_of(B, L)], device=device)
    return torch.arange(L, device=device)[None, :] < valid[:, None]


def make_case(c: Case, dtype, device) -> dict:
    q, k, v, pk, pv = make_inputs(c.B, c.Hq, c.Hkv, c.L, c.P, c.D, dtype, device, G=c.G)
    return dict(q=q, k=k, v=v, pk=pk, pv=pv, prefix_index=prefix_index_of(c.B, c.G, device),
                kv_mask=kv_mask_of(c.B, c.L, device) if c.kv_mask else None)


# ---------------------------------------------------------------- providers
# Each: fn(q, k, v, pk, pv, prefix_index=None, kv_mask=None, **prepared) -> out (B, Hq, L, D);
# PREPARE[name](case tensors) builds what a model builds once per forward (masks), outside the
# timed call, passed as the keyword arguments `prepared`.


def provider_prefix_kernels(q, k, v, pk, pv, prefix_index=None, kv_mask=None):
    return shared_prefix_attention(q, k, v, pk, pv, prefix_index=prefix_index, kv_mask=kv_mask, causal=True)


def provider_prefix_kernels_triton(q, k, v, pk, pv, prefix_index=None, kv_mask=None):
    return shared_prefix_attention(q, k, v, pk, pv, prefix_index=prefix_index, kv_mask=kv_mask, causal=True,
                                   backend="triton")


def provider_prefix_kernels_composed(q, k, v, pk, pv, prefix_index=None, kv_mask=None):
    """backend="composed"; an unknown or declining backend raises (ValueError, NoBackendError):
    the row is skipped with that reason."""
    return shared_prefix_attention(q, k, v, pk, pv, prefix_index=prefix_index, kv_mask=kv_mask, causal=True,
                                   backend="composed")


def provider_prefix_kernels_composed_cudnn(q, k, v, pk, pv, prefix_index=None, kv_mask=None):
    """backend="composed" with cuDNN's kernel first (PREFIX_KERNELS_COMPOSED_KERNELS), to measure
    it against the default order's flash kernel; masked parts keep the memory-efficient kernel."""
    previous = os.environ.get(env.COMPOSED_KERNELS)
    os.environ[env.COMPOSED_KERNELS] = "aten_cudnn,aten_efficient"
    try:
        return provider_prefix_kernels_composed(q, k, v, pk, pv, prefix_index, kv_mask)
    finally:
        if previous is None:
            del os.environ[env.COMPOSED_KERNELS]
        else:
            os.environ[env.COMPOSED_KERNELS] = previous


def hf_mask(B: int, L: int, P: int, kv_mask, device) -> torch.Tensor:
    """The (B, 1, L, P + L) bool mask (True: attend) transformers' sdpa_mask builds once per
    forward for PEFT prefix tuning: the attention mask of P ones then each request's padding,
    causal with P keys of past. Every prefix key is visible to every query."""
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    mask = torch.cat([torch.ones(L, P, dtype=torch.bool, device=device), causal], dim=1).expand(B, 1, L, P + L)
    if kv_mask is not None:
        keys = torch.cat([torch.ones(B, P, dtype=torch.bool, device=device), kv_mask.bool()], dim=1)
        mask = mask & keys[:, None, None, :]
    return mask


def provider_sdpa_copied(q, k, v, pk, pv, prefix_index=None, kv_mask=None, mask=None):
    """Each request's prefix copied in front of its keys (pk[prefix_index], as PEFT's cache holds
    it), GQA heads repeated (transformers' SDPA path repeats them under a mask), SDPA with the
    model's bool mask: `mask` when built beforehand (hf_mask, once per forward), else built here."""
    B, Hq, L, D = q.shape
    Hkv, P = k.shape[1], pk.shape[2]
    prefix_k = pk.expand(B, -1, -1, -1) if prefix_index is None else pk[prefix_index.long()]
    prefix_v = pv.expand(B, -1, -1, -1) if prefix_index is None else pv[prefix_index.long()]
    keys = torch.cat([prefix_k, k], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    values = torch.cat([prefix_v, v], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    if mask is None:
        mask = hf_mask(B, L, P, kv_mask, q.device)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def flex_masks(B: int, L: int, P: int, G: int, prefix_index, kv_mask, device):
    """Block masks (prefix, own). Flex broadcasts K/V of batch 1 over the queries only with a
    block mask (without one it raises: query and key/value batch sizes differ), hence one for the
    prefix even when all of it is visible. G prefixes lie end to end as G * P keys of batch 1;
    request b sees only the P of prefix_index[b] (blocks of other prefixes are skipped, partial
    blocks masked). Own keys: causal, less the padded ones."""
    from torch.nn.attention.flex_attention import create_block_mask

    if G == 1:
        def prefix_mod(b, h, qi, ki):
            return ki >= 0
    else:
        index = prefix_index.long()

        def prefix_mod(b, h, qi, ki):
            return ki // P == index[b]
    if kv_mask is None:
        def own_mod(b, h, qi, ki):
            return ki <= qi
        own = create_block_mask(own_mod, None, None, L, L, device=device)
    else:
        padding = kv_mask.bool()

        def own_mod(b, h, qi, ki):
            return (ki <= qi) & padding[b, ki]
        own = create_block_mask(own_mod, B, None, L, L, device=device)
    whole = create_block_mask(prefix_mod, B, None, L, G * P, device=device)
    return whole, own


def flex_broadcast(q, k, v, pk, pv, whole, own, flex_fn=None):
    """The Flex provider's body: the prefix part (K/V of batch 1 against every request), the own
    part, and their natural-log LSE merge. flex_fn: flex_attention (traced inside the provider's
    one compile) unless given."""
    if flex_fn is None:
        from torch.nn.attention.flex_attention import flex_attention as flex_fn
    G, Hkv, P, D = pk.shape
    if G > 1:  # end to end along the keys: (1, Hkv, G * P, D), a copy of G * P rows, not of B * P
        pk = pk.transpose(0, 1).reshape(1, Hkv, G * P, D)
        pv = pv.transpose(0, 1).reshape(1, Hkv, G * P, D)
    out_p, lse_p = flex_with_lse(flex_fn, q, pk, pv, whole)
    out_r, lse_r = flex_with_lse(flex_fn, q, k, v, own)
    return lse_merge(out_p, lse_p, out_r, lse_r, q.dtype)


def _flex_whole():
    """The provider compiled as one (flex.compiled(flex_broadcast)) while compiled_flex_attention
    is the real compiled Flex; a substitute put there (a CPU test: inductor does not compile Flex
    with its lse on a CPU) runs the body eagerly with it."""
    substitute = compiled_flex_attention()
    if substitute is flex.compiled_flex_attention():
        return flex.compiled(flex_broadcast)
    return functools.partial(flex_broadcast, flex_fn=substitute)


def provider_flex_broadcast(q, k, v, pk, pv, prefix_index=None, kv_mask=None, masks=None):
    if masks is None:
        B, _, L, _ = q.shape
        G, _, P, _ = pk.shape
        masks = flex_masks(B, L, P, G, prefix_index, kv_mask, q.device)
    return _flex_whole()(q, k, v, pk, pv, *masks)


PROVIDERS = {
    "prefix_kernels": provider_prefix_kernels,
    "prefix_kernels_triton": provider_prefix_kernels_triton,
    "prefix_kernels_composed": provider_prefix_kernels_composed,
    "prefix_kernels_composed_cudnn": provider_prefix_kernels_composed_cudnn,
    "sdpa_copied": provider_sdpa_copied,
    "flex_broadcast": provider_flex_broadcast,
}
SDPA = ("sdpa_copied",)
PREPARE = {
    "sdpa_copied": lambda t: dict(mask=hf_mask(t["q"].shape[0], t["q"].shape[2], t["pk"].shape[2], t["kv_mask"],
                                               t["q"].device)),
    "flex_broadcast": lambda t: dict(masks=flex_masks(t["q"].shape[0], t["q"].shape[2], t["pk"].shape[2],
                                                      t["pk"].shape[0], t["prefix_index"], t["kv_mask"],
                                                      t["q"].device)),
}


def bind(name: str, t: dict):
    """fn(q, k, v, pk, pv) of provider `name` for the case's tensors, with its index, padding mask
    and what PREPARE builds once (outside the timed call)."""
    prepared = PREPARE.get(name, lambda t: {})(t)
    return functools.partial(PROVIDERS[name], prefix_index=t["prefix_index"], kv_mask=t["kv_mask"], **prepared)


def make_step(fn, t: dict, mode: str):
    q, k, v, pk, pv = (t[n] for n in ("q", "k", "v", "pk", "pv"))
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(q, k, v, pk, pv)
    else:
        dout = torch.randn_like(q)

        def step():
            out = fn(q, k, v, pk, pv)
            torch.autograd.grad(out, (q, k, v, pk, pv), dout)
    return step


# ---------------------------------------------------------------- measures


def matmul_tflops(device, dtype) -> float | None:
    """Measured dense matmul rate of this card, the yardstick for fractions."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device)[0]
    return 2 * n**3 / (ms * 1e-3) / 1e12


def flops(B, Hq, L, P, D, mode, padding=None) -> float:
    """Visible scores: the whole prefix + the causal half of the own block, less the keys padded
    away (padding: right padding per request, as padding_of)."""
    own = B * L * (L + 1) / 2
    for pad in padding or ():
        # query i sees min(i + 1, L - pad) keys: the rows past the valid keys lose pad.. keys
        own -= pad * (pad + 1) / 2
    entries = Hq * (B * L * P + own)
    fwd = 4 * entries * D
    return fwd if mode == "fwd" else 3.5 * fwd


def run(cases, modes, providers, device, dtype, results: Path, smoke: bool = False,
        compile_cap_s: float | None = COMPILE_CAP_S) -> list[dict]:
    env = environment(device, smoke)
    peak = matmul_tflops(device, dtype)
    progress = Progress(results, len(cases) * len(modes) * len(providers), "attention")
    for names, c in [(n, c) for n in timing_passes(providers) for c in cases]:
        for mode in modes:
            for name in names:
                row = dict(workload="attention", mode=mode, provider=name, variant=c.variant, shape=c.shape(),
                           dtype=str(dtype).replace("torch.", ""), **env)
                if c.kv_mask:
                    row["kv_padding"] = "right padding of (b mod 4) * max(1, L // 128) keys for request b"
                if c.G > 1:
                    row["prefix_index"] = "requests sorted by prefix, B / G each"
                try:
                    t = make_case(c, dtype, device)
                    step = make_step(bind(name, t), t, mode)
                    context = contextlib.nullcontext
                    if name.startswith(flex.COMPILING):
                        row.update(compiled="the whole provider: both Flex calls and the LSE merge",
                                   compile_cap_s=compile_cap_s)
                        row.update(warm(step, device, compile_cap_s))
                    if name in SDPA:
                        backend, context, declined = sdpa.pick_backend(step, device)
                        row.update(sdpa.fields(backend, declined),
                                   mask_built="once per forward, outside the timed call")
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    with context():
                        med, lo, hi = time_ms(step, device)
                    padding = padding_of(c.B, c.L) if c.kv_mask else None
                    tf = flops(c.B, c.Hq, c.L, c.P, c.D, mode, padding) / (med * 1e-3) / 1e12
                    row.update(status="ok", median_ms=med, p20_ms=lo, p80_ms=hi, tflops=tf,
                               frac_matmul=(tf / peak if peak else None), matmul_tflops=peak,
                               peak_mib=(torch.cuda.max_memory_allocated(device) / 2**20
                                         if device.type == "cuda" else None))
                except Exception as exc:  # reported, not dropped
                    row.update(status="skipped", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
                finally:
                    t = step = None
                extra = f" [{row['sdpa_backend']}]" if row.get("sdpa_backend") else ""
                if row.get("compile_s") is not None:
                    extra += f" [compiled in {row['compile_s']:.1f} s]"
                progress.add(row, f"{mode:7s} {c.variant:9s} P={c.P:5d} {name:23s} " + (
                    f"{row['median_ms']:9.3f} ms {row['tflops']:7.2f} TFLOP/s{extra}" if row["status"] == "ok"
                    else f"skipped: {row['reason'].splitlines()[0]}"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    progress.close()
    return progress.rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON-lines file to upsert rows into")
    ap.add_argument("--providers", nargs="*", default=list(PROVIDERS), choices=list(PROVIDERS))
    ap.add_argument("--compiling", choices=("all", "none", "only"), default="all",
                    help="time the compiling (Flex) providers too, not at all, or only them (default all)")
    ap.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS),
                    help="shape variants (default: all on a GPU, base with --smoke)")
    ap.add_argument("--compile-cap-s", type=float, default=COMPILE_CAP_S,
                    help=f"time limit of one Flex compile, outside the timing (default {COMPILE_CAP_S:g} s)")
    args = ap.parse_args(argv)
    variants = args.variants if args.variants is not None else (["base"] if args.smoke else list(VARIANTS))
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        cases = [case("base", 2, 4, 2, 32, P, 32) for P in (4, 16) if "base" in variants]
        cases += [case(v, 4, 4, 2, 32, 16, 32) for v in variants if v != "base"]
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run with --smoke on a CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        cases = [case("base", 16, 32, 8, 1024, P, 128) for P in (16, 128, 1024) if "base" in variants]
        cases += [case(v, 16, 32, 8, 1024, 128, 128) for v in variants if v != "base"]
    providers = flex.select(args.providers, args.compiling)
    return run(cases, ("fwd", "fwd_bwd"), providers, device, dtype, args.out, smoke=args.smoke,
               compile_cap_s=args.compile_cap_s)


if __name__ == "__main__":
    main()
