"""FlexAttention for the benchmarks: one torch.compile'd flex_attention for the whole run, and the
order in which providers are timed.

torch.compile(dynamic=False) builds one graph per input shape and call. A full run needs more than
dynamo's default recompile limit of 8 (decode: 9 shapes x 2 calls; attention: 3 shapes x 2 modes x
2 calls), and past it dynamo stops compiling and flex_attention runs unfused in eager mode,
materialising the scores, under the same provider name: a wrong number, not an error. So the
limit is raised for the run.

Each new shape also costs the compiling providers a compile of seconds, so they are timed after
all the others, over every shape: a run cut at its time limit (the GPU session caps each step)
loses their last rows, not the package's or SDPA's.
"""

from __future__ import annotations

import functools

RECOMPILE_LIMIT = 64
COMPILING = ("flex",)  # provider names starting with these compile per shape


@functools.lru_cache(maxsize=None)
def compiled_flex_attention():
    import torch
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.7; either may exist
        try:
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
            break
        except AttributeError:
            continue
    return torch.compile(flex_attention, dynamic=False)


def timing_passes(providers) -> list[list[str]]:
    """[providers that do not compile, providers that do], each in the given order, empty ones left out."""
    late = [p for p in providers if p.startswith(COMPILING)]
    early = [p for p in providers if p not in late]
    return [names for names in (early, late) if names]
