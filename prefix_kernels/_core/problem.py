"""The problem one call describes, and its checks, done once per call.

Every bad input raises ValueError or TypeError naming the argument and the expected shape; a
likely mistake (transformers' (B, L, H, D) layout, several prefixes without an index) is named
with its fix.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
MAX_DECODE_LQ = 16  # new tokens per request that the decode path takes


@dataclass(frozen=True)
class Problem:
    """The sizes of one call, after its arguments have been checked."""

    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    G: int
    P: int
    dtype: torch.dtype
    device: torch.device
    has_prefix_mask: bool = False  # a (G, P) prefix_mask was given (not every prefix key visible)

    @property
    def group(self) -> int:
        """Query heads per kv head (1: MHA, Hq: MQA)."""
        return self.Hq // self.Hkv


def check_index_range(prefix_index: torch.Tensor, G: int) -> None:
    """Raise if a value lies outside [0, G): a kernel would read another tensor's memory.
    One device sync on a GPU; callers that check once per forward pass index_checked=True on.
    During a CUDA graph capture, a device-side assert instead (no sync)."""
    if prefix_index.device.type == "meta" or torch.compiler.is_compiling():
        return  # values unknown while tracing; the custom ops check them when they run
    if capturing(prefix_index):
        # Inside a CUDA graph capture a host sync is an error: the check is made on the device,
        # and a bad value fails the replay with a device-side assert instead of reading memory.
        torch._assert_async(((prefix_index >= 0) & (prefix_index < G)).all(),
                            f"prefix_index values must be in [0, G) = [0, {G})")
        return
    lo, hi = int(prefix_index.min()), int(prefix_index.max())
    if lo < 0 or hi >= G:
        raise ValueError(f"prefix_index values must be in [0, G) = [0, {G}), got range [{lo}, {hi}]")


def capturing(x: torch.Tensor) -> bool:
    """Whether x's CUDA stream is capturing a CUDA graph (no host sync may happen)."""
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_prefix_index(prefix_index, B: int, G: int, device: torch.device, *, values: bool = True) -> None:
    """prefix_index: a (B,) integer tensor on `device` (with values in [0, G) when `values`)."""
    if not isinstance(prefix_index, torch.Tensor):
        raise TypeError(f"prefix_index must be a (B,) = ({B},) integer tensor or None, got {type(prefix_index).__name__}")
    if prefix_index.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"prefix_index must be an integer tensor of shape ({B},), got dtype {prefix_index.dtype}")
    if prefix_index.shape != (B,):
        raise ValueError(f"prefix_index must have shape (B,) = ({B},), got {tuple(prefix_index.shape)}")
    if prefix_index.device != device:
        raise ValueError(f"prefix_index is on {prefix_index.device} but q is on {device}")
    if values:
        check_index_range(prefix_index, G)


def refuse_forward_ad(*tensors) -> None:
    """Raise if an input carries a forward-mode tangent (torch.func.jvp, jacfwd, forward_ad):
    the custom ops have no jvp rule, and torch returns a zero tangent for them without an error."""
    if fwAD._current_level < 0:  # no dual level open: no input can carry a tangent
        return
    if any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(
            "prefix_kernels: forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) is not "
            "implemented; reverse mode (.backward(), torch.autograd.grad) is")


def _expect_tensor(name: str, x, shape_doc: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D {shape_doc}, got shape {tuple(x.shape)}")


def _layout_hint(q, k, v, prefix_k) -> str | None:
    """The fix, when q, k and v look like transformers' (B, L, H, D) layout instead of (B, H, L, D):
    read that way the sizes agree with each other and with the prefix, and read as given they do not."""
    def consistent(qh, kh, vh_shape, D_q):
        B = q.shape[0]
        return (kh[0] == B and tuple(vh_shape) == tuple(kh) and kh[3] == D_q and kh[1] >= 1 and qh % kh[1] == 0
                and prefix_k.shape[1] == kh[1] and prefix_k.shape[3] == D_q)
    as_given = consistent(q.shape[1], tuple(k.shape), v.shape, q.shape[3])
    swapped_k = (k.shape[0], k.shape[2], k.shape[1], k.shape[3])
    swapped_v = (v.shape[0], v.shape[2], v.shape[1], v.shape[3])
    if not as_given and consistent(q.shape[2], swapped_k, swapped_v, q.shape[3]):
        return ("q, k and v look like transformers' (B, L, H, D) layout; this op takes (B, H, L, D): pass "
                "q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2) (views, no copy) and transpose the output back")
    return None


def check_inputs(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, scale, causal=True, *,
                 index_values: bool = True, prefix_mask=None) -> Problem:
    """Validate the arguments of shared_prefix_attention and return the problem's sizes.

    index_values=False skips the range check of prefix_index's values (a device sync), for a
    caller that has checked this index once for every layer of a forward."""
    if not isinstance(causal, bool):  # bool("false") is True: a non-bool is refused, not read by truth
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    _expect_tensor("q", q, "(B, Hq, Lq, D)")
    _expect_tensor("k", k, "(B, Hkv, Lk, D)")
    _expect_tensor("v", v, "(B, Hkv, Lk, D)")
    _expect_tensor("prefix_k", prefix_k, "(G, Hkv, P, D)")
    _expect_tensor("prefix_v", prefix_v, "(G, Hkv, P, D)")
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape
    G, _, P, _ = prefix_k.shape
    hint = _layout_hint(q, k, v, prefix_k)
    if hint is not None:
        raise ValueError(f"{hint} (got q {tuple(q.shape)}, k {tuple(k.shape)}, prefix_k {tuple(prefix_k.shape)})")

    for name, x in (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; supported: float16, bfloat16, float32")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; all five must match")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; all inputs must share a device")

    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} of q is not supported: it must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q has Hq={Hq} heads, k has Hkv={Hkv}: Hq must be a positive multiple of Hkv (GQA/MQA)")
    if Lq == 0 or B == 0 or Hq == 0:
        raise ValueError(f"q must have B, Hq, Lq >= 1, got shape {tuple(q.shape)}")
    if G == 0:
        raise ValueError(f"prefix_k must hold G >= 1 prefixes, got shape {tuple(prefix_k.shape)}")
    expected = {
        "k": (B, Hkv, Lk, D),
        "v": (B, Hkv, Lk, D),
        "prefix_k": (G, Hkv, P, D),
        "prefix_v": (G, Hkv, P, D),
    }
    for name, x in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if tuple(x.shape) != expected[name]:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}, expected {expected[name]} "
                f"(batch B={B}, kv heads Hkv={Hkv}, head dim D={D} from q and k)"
            )

    if prefix_index is not None:
        check_prefix_index(prefix_index, B, G, q.device, values=index_values)
    elif G > 1:
        raise ValueError(
            f"prefix_k holds G={G} prefixes but prefix_index is None: pass prefix_index, a (B,) = ({B},) integer "
            "tensor naming each request's prefix (without it every request would read prefix 0)")

    if kv_mask is not None:
        if not isinstance(kv_mask, torch.Tensor):
            raise TypeError(f"kv_mask must be a (B, Lk) = ({B}, {Lk}) bool tensor or None, got {type(kv_mask).__name__}")
        if kv_mask.dtype != torch.bool:
            raise TypeError(f"kv_mask must have dtype torch.bool (True = may attend), got {kv_mask.dtype}")
        if kv_mask.shape != (B, Lk):
            raise ValueError(f"kv_mask must have shape (B, Lk) = ({B}, {Lk}), got {tuple(kv_mask.shape)}")
        if kv_mask.device != q.device:
            raise ValueError(f"kv_mask is on {kv_mask.device} but q is on {q.device}")

    if prefix_mask is not None:
        if not isinstance(prefix_mask, torch.Tensor):
            raise TypeError(f"prefix_mask must be a (G, P) = ({G}, {P}) bool tensor or None, "
                            f"got {type(prefix_mask).__name__}")
        if prefix_mask.dtype != torch.bool:
            raise TypeError(f"prefix_mask must have dtype torch.bool (True = may attend), got {prefix_mask.dtype}")
        if prefix_mask.shape != (G, P):
            raise ValueError(f"prefix_mask must have shape (G, P) = ({G}, {P}) (one row per prefix of prefix_k), "
                             f"got {tuple(prefix_mask.shape)}")
        if prefix_mask.device != q.device:
            raise ValueError(f"prefix_mask is on {prefix_mask.device} but q is on {q.device}")

    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):  # numpy scalars are Real
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        try:
            value = float(scale)
        except OverflowError:  # an int past float's range
            raise ValueError(f"scale must be finite, got an int of {int(scale).bit_length()} bits") from None
        if not math.isfinite(value):
            raise ValueError(f"scale must be finite, got {scale}")

    return Problem(B, Hq, Hkv, Lq, Lk, D, G, P, q.dtype, q.device, prefix_mask is not None)


def check_decode_lq(p: Problem, q) -> None:
    if not 1 <= p.Lq <= MAX_DECODE_LQ:
        raise ValueError(
            f"q has Lq={p.Lq} query tokens per request (shape {tuple(q.shape)}); shared_prefix_decode takes "
            f"1 to {MAX_DECODE_LQ}: use shared_prefix_attention for longer queries"
        )
