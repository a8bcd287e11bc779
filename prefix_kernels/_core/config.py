"""Switches that measurements decide, in one place (see benchmarks/NOTES.md for the evidence).

FUSE_PARTS, per decode backend: run the prefix part and the per-request part as one launch whose
programs (Triton) or blocks (CUDA) alternate between the two, so that at large batch the
compute-bound prefix work can overlap the memory-bound cache reads. Same partials, same merge:
bit-identical results either way. Off until a GPU run shows it faster (bench_decode.py times
both launches of both backends).
"""

FUSE_PARTS = {"triton": False, "cuda": False}
