"""Switches that measurements decide, in one place (see benchmarks/NOTES.md for the evidence).

FUSE_PARTS, per decode backend: run the prefix part and the per-request part as one launch whose
programs (Triton) or blocks (CUDA) alternate between the two, so that at large batch the
compute-bound prefix work can overlap the memory-bound cache reads. Same partials, same merge:
bit-identical results either way. Off until a GPU run shows it faster (bench_decode.py times
both launches of both backends).

FUSE_MERGE, Triton decode only: where the own part runs in one split (the common case at serving
batch sizes) and after the prefix part (FUSE_PARTS off), with a row block that fits in registers
(backends/triton/tiles.merge_fits), the own-cache kernel merges its rows' state with the prefix
partials itself and writes the final output, instead of writing its own partial for a third
launch to merge. One launch less and no own partial written or read back; the same arithmetic
(fp32 log-sum-exp, fixed order), so the results differ from the unfused merge by fp32 rounding
only. On by default: it removes a launch and a round trip of partials and adds no spill
(compiled offline; not yet timed on a GPU). Off gives the three launches, for tests and
benchmarks to compare (bench_decode.py's prefix_kernels_triton_unfused_merge).
"""

FUSE_PARTS = {"triton": False, "cuda": False}
FUSE_MERGE = {"triton": True}
