"""Shared-prefix decode step (Lq = 1), against the alternatives.

Providers (each reported as skipped with its reason when it cannot run):
  prefix_kernels_triton  shared_prefix_decode(backend="triton")
  prefix_kernels_triton_fused
                         the same with the triton launcher's fuse_parts on: the prefix and own
                         parts in one interleaved grid (by default, FUSE_PARTS "auto", only where
                         a model says the prefix part is compute-bound enough to gain; NOTES.md)
  prefix_kernels_triton_separate_parts
                         the same with fuse_parts off: the parts as separate launches everywhere,
                         so that the default, fused and separate are all timed
  prefix_kernels_triton_unfused_merge
                         the same with FUSE_MERGE off: the merge in a launch of its own even where
                         the own-cache kernel could merge (one own split), to time what fusing the
                         merge saves (on by default)
  prefix_kernels_cuda    shared_prefix_decode(backend="cuda") (the optional CUDA extension)
  prefix_kernels_cuda_fused
                         the same with the extension's fuse_parts on (parts_kernel)
  prefix_kernels_cuda_separate_parts
                         the same with fuse_parts off
  sdpa_expanded          SDPA over caches that already hold each request's copy of the prefix
                         (B, Hkv, P + T, D), built outside the timed region: a plain KV cache
                         without prefix sharing
                         (the SDPA backend chosen once and pinned: sdpa.py; sdpa_backend in the row)
  flex                   FlexAttention twice, merged by log-sum-exp, the whole step (both calls and
                         the merge) compiled as one: the prefix as K/V of batch 1 broadcast over the
                         requests, then the own caches; compiled before the timing under its own
                         time limit (--compile-cap-s), its seconds in the row (compile_s)
  flashinfer_cascade     FlashInfer's MultiLevelCascadeAttentionWrapper, two levels (shared prefix
                         pages, then each request's pages), paged cache built outside the timing.
                         Without FlashInfer its rows say skipped with the ImportError, and the run
                         prints a warning first (a missing baseline is not a quiet gap)

Shapes from the decode issue: B in {8, 64, 256}, P in {1024, 4096, 16384}, T = 256, Lq = 1,
Hq = 32, Hkv = 8, D = 128, bf16, one prefix, no padding. Timing: triton.testing.do_bench (CUDA
events, L2 flushed before every run, median and 20/80 quantiles). GB/s counts the bytes the step
must read and write: the prefix once, each request's own cache, q and out; it is also given as a
fraction of the device-to-device copy bandwidth this script measures on the same card
(frac_copy_bw, copy_gbps) and of the card's datasheet HBM bandwidth (frac_hbm_datasheet,
hbm_datasheet_gbps: rows.DATASHEET_HBM_GBPS, keyed by the GPU's name; null with the reason for a
GPU not in it, or on a CPU). Every row records max|out - torch backend| so that a provider
computing the wrong thing shows.

CUDA graphs: every provider's step is also captured once in a torch.cuda.CUDAGraph after its
warm-up and its replays timed the same way (graph_ms, graph_p20_ms, graph_p80_ms, graph_gbps,
graph_max_abs_err_vs_torch beside the eager median_ms): what a serving loop that replays its
decode step pays, without the launch and Python overhead. A step that cannot be captured (a host
synchronisation, an allocation the capture refuses) keeps its eager numbers and says why in
graph_reason; on a CPU graph_ms is null with that reason.

    python benchmarks/bench_decode.py             # GPU, full shapes
    python benchmarks/bench_decode.py --compiling none    # GPU, all but the Flex provider
    python benchmarks/bench_decode.py --smoke     # CPU, tiny shapes (Triton interpreter)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before prefix_kernels imports triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flex  # noqa: E402
import sdpa  # noqa: E402
from flex import flex_with_lse, lse_merge, timing_passes  # noqa: E402
from rows import Progress, datasheet_hbm, environment  # noqa: E402
from timing import NO_GRAPH_ON_CPU, graph_replay_ms, time_ms, warm  # noqa: E402

from prefix_kernels import shared_prefix_decode  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "decode.jsonl"
COMPILE_CAP_S = 90.0  # default --compile-cap-s: one Flex compile (a shape) at most


def make_inputs(B, Hq, Hkv, T, P, D, dtype, device):
    torch.manual_seed(0)
    q = torch.randn(B, Hq, 1, D, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, T, D, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, T, D, dtype=dtype, device=device)
    pk = torch.randn(1, Hkv, P, D, dtype=dtype, device=device)
    pv = torch.randn(1, Hkv, P, D, dtype=dtype, device=device)
    return q, k, v, pk, pv


def bytes_moved(B, Hq, Hkv, T, P, D, itemsize) -> int:
    """What a decode step must read and write at least: prefix once, own caches, q and out."""
    return itemsize * (2 * Hkv * P * D + 2 * B * Hkv * T * D + 2 * B * Hq * D)


# Each provider: setup(q, k, v, pk, pv) -> step() returning out (B, Hq, 1, D). Setup work (cache
# layouts, plans, compilation) happens outside the timed region.


def setup_prefix_kernels(backend):
    def setup(q, k, v, pk, pv):
        shared_prefix_decode(q, k, v, pk, pv, backend=backend)  # raises NoBackendError with reasons
        return lambda: shared_prefix_decode(q, k, v, pk, pv, backend=backend)

    return setup


def setup_fused(backend, switch="FUSE_PARTS", value=True):
    """shared_prefix_decode(backend=...) with one of _core.config's switches (FUSE_PARTS,
    FUSE_MERGE) set to `value` for the call: the dispatch, checks and custom op exactly as a user
    gets them, only the launches differ."""

    def setup(q, k, v, pk, pv):
        from prefix_kernels._core import config as module

        table = getattr(module, switch)

        def step():
            before, table[backend] = table[backend], value
            try:
                return shared_prefix_decode(q, k, v, pk, pv, backend=backend)
            finally:
                table[backend] = before

        step()  # raises NoBackendError with reasons
        return step

    return setup


def setup_sdpa_expanded(q, k, v, pk, pv):
    B = q.shape[0]
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
    values = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    return lambda: F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)


def flex_step(q, k, v, pk, pv, whole):
    """The Flex provider's step, compiled whole: the prefix (K/V of batch 1, broadcast through the
    all-visible block mask), the own caches, and their natural-log LSE merge."""
    from torch.nn.attention.flex_attention import flex_attention

    out_p, lse_p = flex_with_lse(flex_attention, q, pk, pv, whole)
    out_r, lse_r = flex_with_lse(flex_attention, q, k, v)
    return lse_merge(out_p, lse_p, out_r, lse_r, q.dtype)


def setup_flex(q, k, v, pk, pv):
    from torch.nn.attention.flex_attention import create_block_mask

    # Flex broadcasts K/V of batch 1 over the queries only with a block mask: an all-visible one.
    whole = create_block_mask(lambda b, h, qi, ki: ki >= 0, q.shape[0], None, q.shape[2], pk.shape[2], device=q.device)
    step = flex.compiled(flex_step)
    return lambda: step(q, k, v, pk, pv, whole)


def flashinfer_missing() -> str | None:
    """The ImportError's text when FlashInfer cannot be imported, else None."""
    try:
        import flashinfer  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def setup_flashinfer_cascade(q, k, v, pk, pv):
    import flashinfer  # noqa: F401  (skipped with the ImportError when missing)
    from flashinfer.cascade import MultiLevelCascadeAttentionWrapper

    B, Hq, _, D = q.shape
    Hkv, T, P = k.shape[1], k.shape[2], pk.shape[2]
    page = 16
    if P % page or T % page:
        raise ValueError(f"P={P} and T={T} must be multiples of the page size {page}")
    dev = q.device
    shared_pages, own_pages = P // page, T // page
    # Unified paged cache, NHD: (pages, 2, page, Hkv, D); shared prefix pages first.
    pre = torch.stack([pk[0], pv[0]], 0).permute(2, 0, 1, 3)  # (P, 2, Hkv, D)
    pre = pre.reshape(shared_pages, page, 2, Hkv, D).transpose(1, 2)
    own = torch.stack([k, v], 1).permute(0, 3, 1, 2, 4)  # (B, T, 2, Hkv, D)
    own = own.reshape(B * own_pages, page, 2, Hkv, D).transpose(1, 2)
    cache = torch.cat([pre, own], 0).contiguous()
    i32 = dict(dtype=torch.int32, device=dev)
    wrapper = MultiLevelCascadeAttentionWrapper(2, torch.empty(256 << 20, dtype=torch.uint8, device=dev), "NHD")
    wrapper.plan(
        [torch.tensor([0, B], **i32), torch.arange(B + 1, **i32)],
        [torch.tensor([0, shared_pages], **i32), torch.arange(B + 1, **i32) * own_pages],
        [torch.arange(shared_pages, **i32), shared_pages + torch.arange(B * own_pages, **i32)],
        [torch.tensor([page], **i32), torch.full((B,), page, **i32)],
        Hq, Hkv, D, page, causal=False, q_data_type=q.dtype,
    )
    q3 = q[:, :, 0].contiguous()  # (B, Hq, D)
    return lambda: wrapper.run(q3, cache)[:, :, None]


PROVIDERS = {
    "prefix_kernels_triton": setup_prefix_kernels("triton"),
    "prefix_kernels_triton_fused": setup_fused("triton"),
    "prefix_kernels_triton_unfused_merge": setup_fused("triton", "FUSE_MERGE", False),
    "prefix_kernels_triton_separate_parts": setup_fused("triton", "FUSE_PARTS", False),
    "prefix_kernels_cuda": setup_prefix_kernels("cuda"),
    "prefix_kernels_cuda_fused": setup_fused("cuda"),
    "prefix_kernels_cuda_separate_parts": setup_fused("cuda", "FUSE_PARTS", False),
    "sdpa_expanded": setup_sdpa_expanded,
    "flex": setup_flex,
    "flashinfer_cascade": setup_flashinfer_cascade,
}
SDPA = ("sdpa_expanded",)


def copy_bandwidth_gbps(device) -> float | None:
    """Device-to-device copy of 2 GiB (1 GiB read + 1 GiB written): the yardstick for fractions."""
    if device.type != "cuda":
        return None
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)[0]
    return 2 * n / (ms * 1e-3) / 1e9


def flashinfer_warning(providers) -> str | None:
    """The loud line for a run asked to time FlashInfer where it cannot be imported (printed to
    stderr before any timing; each of its rows also says skipped with the ImportError)."""
    if not any(p.startswith("flashinfer") for p in providers):
        return None
    missing = flashinfer_missing()
    if missing is None:
        return None
    return (f"WARNING: FlashInfer is not importable ({missing}): the flashinfer_cascade baseline is SKIPPED "
            "at every shape. Install flashinfer-python (on a GPU machine without network: "
            "bash benchmarks/gpu_wheels.sh --aot here, then carry .whl/ along).")


def graph_fields(step, device, want, nbytes) -> dict:
    """The CUDA-graph replay of one step: graph_ms (median), p20/p80, GB/s and its error against
    the torch backend; or graph_ms null with graph_reason (no GPU, or why the capture failed)."""
    if device.type != "cuda":
        return dict(graph_ms=None, graph_reason=NO_GRAPH_ON_CPU)
    try:
        (med, lo, hi), err = graph_replay_ms(step, device, check=lambda out: float((out.float() - want).abs().max()))
    except Exception as exc:  # recorded beside the eager numbers, not raised
        try:
            torch.cuda.synchronize(device)
        except Exception:
            pass
        return dict(graph_ms=None, graph_reason=f"capture failed: {type(exc).__name__}: {str(exc)[:300]}")
    return dict(graph_ms=med, graph_p20_ms=lo, graph_p80_ms=hi, graph_gbps=nbytes / (med * 1e-3) / 1e9,
                graph_max_abs_err_vs_torch=err)


def hbm_fields(device, copy_gbps) -> dict:
    """The card's datasheet HBM bandwidth and the measured copy rate's fraction of it (null with
    the reason where the table has no entry, or on a CPU)."""
    sheet = datasheet_hbm(device)
    gbps = sheet["hbm_datasheet_gbps"]
    sheet["copy_frac_hbm_datasheet"] = copy_gbps / gbps if gbps and copy_gbps else None
    return sheet


def run(shapes, providers, device, dtype, results: Path, smoke: bool = False,
        compile_cap_s: float | None = COMPILE_CAP_S) -> list[dict]:
    env = environment(device, smoke)
    warning = flashinfer_warning(providers)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    hbm = copy_bandwidth_gbps(device)
    sheet = hbm_fields(device, hbm)
    progress = Progress(results, len(shapes) * len(providers), "decode")
    for names, (B, Hq, Hkv, T, P, D) in [(n, s) for n in timing_passes(providers) for s in shapes]:
        shape = dict(B=B, Hq=Hq, Hkv=Hkv, Lq=1, T=T, P=P, D=D, G=1, causal=True)
        nbytes = bytes_moved(B, Hq, Hkv, T, P, D, torch.finfo(dtype).bits // 8)
        with torch.no_grad():
            q, k, v, pk, pv = make_inputs(B, Hq, Hkv, T, P, D, dtype, device)
            want = shared_prefix_decode(q, k, v, pk, pv, backend="torch").float()
            for name in names:
                row = dict(workload="decode", mode="fwd", provider=name, shape=shape,
                           dtype=str(dtype).replace("torch.", ""), bytes=nbytes, **sheet, **env)
                try:
                    step = PROVIDERS[name](q, k, v, pk, pv)
                    context = contextlib.nullcontext
                    if name.startswith(flex.COMPILING):
                        row.update(compiled="the whole step: both Flex calls and the LSE merge",
                                   compile_cap_s=compile_cap_s)
                        row.update(warm(step, device, compile_cap_s))
                    if name in SDPA:
                        backend, context, declined = sdpa.pick_backend(step, device)
                        row.update(sdpa.fields(backend, declined))
                    with context():
                        err = float((step().float() - want).abs().max())
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                            torch.cuda.reset_peak_memory_stats(device)
                        med, lo, hi = time_ms(step, device)
                        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
                        graph = graph_fields(step, device, want, nbytes)
                    gbps = nbytes / (med * 1e-3) / 1e9
                    datasheet = row["hbm_datasheet_gbps"]
                    row.update(status="ok", median_ms=med, p20_ms=lo, p80_ms=hi, gbps=gbps,
                               frac_copy_bw=(gbps / hbm if hbm else None), copy_gbps=hbm,
                               frac_hbm_datasheet=(gbps / datasheet if datasheet else None),
                               max_abs_err_vs_torch=err, peak_mib=peak_mib, **graph)
                except Exception as exc:  # reported, not dropped
                    row.update(status="skipped", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
                    if name.startswith("flashinfer") and isinstance(exc, ImportError):
                        row["warning"] = "FlashInfer is not importable: this baseline is missing from the comparison"
                finally:
                    step = None
                progress.add(row, f"B={B:4d} P={P:6d} {name:27s} " + (_line(row) if row["status"] == "ok"
                                                                      else f"SKIPPED: {row['reason'].splitlines()[0]}"))
        del q, k, v, pk, pv, want
        if device.type == "cuda":
            torch.cuda.empty_cache()
    progress.close()
    if warning:
        print(warning, file=sys.stderr, flush=True)  # again under the table, where it is read
    return progress.rows


def _line(row: dict) -> str:
    line = f"{row['median_ms']:9.4f} ms {row['gbps']:8.1f} GB/s err {row['max_abs_err_vs_torch']:.2e}"
    if row.get("frac_hbm_datasheet") is not None:
        line += f" {100 * row['frac_hbm_datasheet']:5.1f}% of HBM"
    if row.get("graph_ms") is not None:
        line += f" graph {row['graph_ms']:9.4f} ms"
    elif row.get("graph_reason") and row["graph_reason"] != NO_GRAPH_ON_CPU:
        line += f" graph: {row['graph_reason'][:80]}"
    if row.get("sdpa_backend"):
        line += f" [{row['sdpa_backend']}]"
    if row.get("compile_s") is not None:
        line += f" [compiled in {row['compile_s']:.1f} s]"
    return line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON-lines file to upsert rows into")
    ap.add_argument("--providers", nargs="*", default=list(PROVIDERS), choices=list(PROVIDERS))
    ap.add_argument("--compiling", choices=("all", "none", "only"), default="all",
                    help="time the compiling (Flex) provider too, not at all, or only it (default all)")
    ap.add_argument("--compile-cap-s", type=float, default=COMPILE_CAP_S,
                    help=f"time limit of one Flex compile, outside the timing (default {COMPILE_CAP_S:g} s)")
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        shapes = [(2, 4, 2, 16, P, 32) for P in (16, 48)]
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run with --smoke on a CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = [(B, 32, 8, 256, P, 128) for B in (8, 64, 256) for P in (1024, 4096, 16384)]
    return run(shapes, flex.select(args.providers, args.compiling), device, dtype, args.out, smoke=args.smoke,
               compile_cap_s=args.compile_cap_s)


if __name__ == "__main__":
    main()
