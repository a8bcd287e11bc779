"""FlexAttention for the benchmarks: each Flex provider compiled whole, and the order in which
providers are timed.

A Flex provider here is two flex_attention calls (the shared prefix, then each request's own
keys) merged by their log-sum-exp. The whole function, both calls and the merge, goes into one
torch.compile (`compiled(fn)`), as a user who compiles their attention layer would have it: the
merge is then inductor's to fuse, instead of running eagerly in fp32 between two compiled calls.
flex_attention's lse is in natural log (it converts its kernels' base 2 itself), as is ours.

torch.compile(dynamic=False) builds one graph per input shape and call. A full run needs more than
dynamo's default recompile limit of 8 (decode: 9 shapes; attention: 6 shapes x 2 modes), and past
it dynamo stops compiling and flex_attention runs unfused in eager mode, materialising the scores,
under the same provider name: a wrong number, not an error. So the limit is raised for the run.

Each new shape also costs the compiling providers a compile of seconds. The scripts warm each
one before its timed region (timing.warm: the first call, under its own time limit, recorded in
the row as compile_s and compile_cap_s), and time them after all the others, over every shape;
gpu_session.py runs them as steps of their own (`--compiling only`) with their own caps, so that
their compiles cut neither the other providers' rows nor, within reason, their own.
"""

from __future__ import annotations

import functools

RECOMPILE_LIMIT = 64
COMPILING = ("flex",)  # provider names starting with these compile per shape


def _raise_recompile_limit() -> None:
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.7; either may exist
        try:
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
            break
        except AttributeError:
            continue


def compiled(fn):
    """fn compiled whole with torch.compile(dynamic=False), once for the run (one object per fn,
    so that its graphs for every shape stay cached); the recompile limit raised."""
    _raise_recompile_limit()
    return _compile(fn)


@functools.lru_cache(maxsize=None)
def _compile(fn):
    import torch

    return torch.compile(fn, dynamic=False)


@functools.lru_cache(maxsize=None)
def compiled_flex_attention():
    """flex_attention alone, compiled: what the providers used before they were compiled whole
    (bench_attention keeps it as the seam through which a CPU test runs its provider eagerly)."""
    from torch.nn.attention.flex_attention import flex_attention

    return compiled(flex_attention)


def flex_with_lse(flex, q, k, v, block_mask=None):
    """(out, lse) of one Flex call, lse natural-log float32 (B, Hq, Lq): return_aux=AuxRequest(lse=True)
    where torch has it (2.9+; return_lse is deprecated there), else return_lse=True."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return flex(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True)
    out, aux = flex(q, k, v, block_mask=block_mask, enable_gqa=True, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def lse_merge(out_a, lse_a, out_b, lse_b, dtype):
    """Two parts over disjoint keys merged by their natural-log LSE, in fp32, cast to dtype."""
    import torch

    lse = torch.logaddexp(lse_a, lse_b)
    return (torch.exp(lse_a - lse)[..., None] * out_a.float()
            + torch.exp(lse_b - lse)[..., None] * out_b.float()).to(dtype)


def timing_passes(providers) -> list[list[str]]:
    """[providers that do not compile, providers that do], each in the given order, empty ones left out."""
    late = [p for p in providers if p.startswith(COMPILING)]
    early = [p for p in providers if p not in late]
    return [names for names in (early, late) if names]


def select(providers, compiling: str) -> list[str]:
    """The providers a run times: all, none of the compiling ones ("none"), or only those ("only")."""
    if compiling == "none":
        return [p for p in providers if not p.startswith(COMPILING)]
    if compiling == "only":
        return [p for p in providers if p.startswith(COMPILING)]
    return list(providers)
