"""`prefix-kernels verify`: every backend this machine can run, against the float64 reference.

For each case of a sweep (odd lengths, GQA/MQA, several prefixes with a mixed prefix_index, left
padding, causal and not, head dims 64/80/128) and each backend that accepts it, the op runs
forward and backward (the decode path forward only) and each quantity (out, lse, the five
gradients) gets its error ratio err / bound under the rule in `accuracy.py`: <= 1 passes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from .._core import accuracy
from .._core.problem import check_inputs
from ..api import shared_prefix_attention, shared_prefix_decode
from ..backends import registry
from ..backends.reference import reference_attention

NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


@dataclass(frozen=True)
class Case:
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    P: int
    D: int
    G: int
    causal: bool
    dtype: torch.dtype

    def label(self) -> str:
        return (f"B{self.B} H{self.Hq}/{self.Hkv} Lq{self.Lq} Lk{self.Lk} P{self.P} D{self.D} G{self.G} "
                f"{'causal' if self.causal else 'full'} {str(self.dtype).replace('torch.', '')}")


def sweep(device: torch.device, quick: bool = False) -> list:
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    shapes = [(3, 8, 2, 37, 46, 17, 64, 2), (2, 4, 4, 61, 61, 130, 80, 1), (4, 8, 1, 1, 300, 257, 128, 2),
              (2, 4, 2, 13, 13, 0, 80, 1)]
    if device.type == "cuda" and not quick:
        shapes += [(8, 32, 8, 512, 512, 128, 128, 1), (64, 32, 8, 1, 1024, 1024, 128, 2)]
    cases = [Case(*s, causal, dt) for s, causal, dt in itertools.product(shapes, (True, False), dtypes)]
    return cases[::3] if quick else cases


def _inputs(c: Case, device):
    g = torch.Generator().manual_seed(hash((c.B, c.Lq, c.Lk, c.P, c.D)) % 2**31)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=c.dtype)  # noqa: E731
    tensors = [mk(c.B, c.Hq, c.Lq, c.D), mk(c.B, c.Hkv, c.Lk, c.D), mk(c.B, c.Hkv, c.Lk, c.D),
               mk(c.G, c.Hkv, c.P, c.D), mk(c.G, c.Hkv, c.P, c.D)]
    index = torch.tensor([(c.G - 1 - b) % c.G for b in range(c.B)], device=device) if c.G > 1 else None
    lengths = torch.randint(1, c.Lk + 1, (c.B,), generator=g) if c.Lk else torch.zeros(c.B, dtype=torch.long)
    mask = (torch.arange(c.Lk)[None, :] >= (c.Lk - lengths)[:, None]).to(device)  # left padding
    return tensors, index, mask


def _reference(tensors, index, mask, causal, dtype, dout, need_grads):
    ts = [t.detach().to(dtype).requires_grad_(need_grads) for t in tensors]
    out, lse = reference_attention(*ts, prefix_index=index, kv_mask=mask, causal=causal, compute_dtype=dtype)
    grads = torch.autograd.grad(out, ts, dout.to(out.dtype)) if need_grads else ()
    return [out, lse, *grads]


def check(c: Case, backend: str, device, decode: bool) -> dict:
    """{quantity: error ratio} for one case and backend."""
    tensors, index, mask = _inputs(c, device)
    dout = torch.randn(c.B, c.Hq, c.Lq, c.D, device=device).to(c.dtype)
    truth = _reference(tensors, index, mask, c.causal, torch.float64, dout, not decode)
    same = _reference(tensors, index, mask, c.causal, c.dtype, dout, not decode)
    fn = shared_prefix_decode if decode else shared_prefix_attention
    ts = [t.detach().requires_grad_(not decode) for t in tensors]
    with torch.set_grad_enabled(not decode):
        out, lse = fn(*ts, prefix_index=index, kv_mask=mask, causal=c.causal, return_lse=True, backend=backend)
    got = [out, lse] + (list(torch.autograd.grad(out, ts, dout)) if not decode else [])
    names = ["out", "lse"] + ["d" + n for n in NAMES][: len(got) - 2]
    ratios = {}
    for name, x, s, t in zip(names, got, same, truth):
        finite = torch.isfinite(t) if name == "lse" else torch.ones_like(t, dtype=torch.bool)
        qdtype = torch.float32 if name == "lse" else c.dtype
        err, _, bound = accuracy.measure(x[finite], s[finite], t[finite], qdtype)
        ratios[name] = err / bound if bound > 0 else (0.0 if err == 0 else math.inf)
        if torch.isnan(x).any():
            ratios[name] = math.inf
    return ratios


# Each public backend's reasons for the training op and for the decode path.
REASONS = registry.reasons_table(decode=False)
DECODE_REASONS = registry.reasons_table(decode=True)
# The backends verify checks, in the registry's order; "reference" is what they are checked against.
BACKENDS = tuple(dict.fromkeys(b for table in (DECODE_REASONS, REASONS) for b in table if b != "reference"))


def _check_backends(backends) -> tuple:
    unknown = sorted(set(backends or ()) - set(BACKENDS))
    if unknown:
        raise ValueError(f"backends={unknown}: verify checks {', '.join(BACKENDS)}")
    return tuple(b for b in BACKENDS if not backends or b in backends)


def run(device=None, quick: bool = False, printer=print, backends=None) -> bool:
    """Run the sweep; True when every (case, backend) passes and at least one case ran.

    `backends`: only these names. A backend that could take no case of the sweep gets a line
    saying why (its first reason): a verify that checked nothing must not read as a pass."""
    wanted = _check_backends(backends)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ok, ran, skipped = True, dict.fromkeys(wanted, 0), {}
    printer(f"{'case':48} {'path':8} {'backend':9} {'worst quantity':>14} {'ratio':>7}  result")
    for c in sweep(device, quick):
        tensors, index, mask = _inputs(c, device)
        problem = check_inputs(*tensors, index, mask, None)
        paths = [("train", False, REASONS)] + ([("decode", True, DECODE_REASONS)] if c.Lq <= 16 else [])
        for path, decode, reasons in paths:
            for backend in wanted:
                if backend not in reasons:
                    continue
                why = reasons[backend](problem)
                if why:
                    skipped.setdefault(backend, f"{path}: {'; '.join(why)}")
                    continue
                ran[backend] += 1
                passed, line = _check_line(c, backend, device, decode)
                ok &= passed
                printer(f"{c.label():48} {path:8} {backend:9} {line}")
    for backend, count in ran.items():
        if not count:
            printer(f"{backend}: skipped: {skipped.get(backend, 'no case of the sweep')}")
    if not any(ran.values()):
        printer(f"nothing was checked: none of {', '.join(wanted)} can run on {device.type} here")
        return False
    printer("all passed" if ok else "FAILURES above")
    return ok


def _check_line(c: Case, backend: str, device, decode: bool) -> tuple:
    """(passed, the result columns) for one case and backend."""
    try:
        ratios = check(c, backend, device, decode)
        worst = max(ratios, key=ratios.get)
        passed = ratios[worst] <= 1.0
        return passed, f"{worst:>14} {ratios[worst]:7.3f}  {'pass' if passed else 'FAIL'}"
    except Exception as exc:  # a crash is a failure, reported with its reason
        return False, f"{'':>14} {'':>7}  FAIL ({type(exc).__name__}: {str(exc)[:80]})"
