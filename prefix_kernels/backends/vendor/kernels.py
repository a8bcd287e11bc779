"""The attention kernels the composition runs on, each behind one small interface.

A kernel takes (B, H, L, D) tensors whose last dim has unit stride (transformers' views; the
package's outputs) and computes one attention call:

    forward(q, k, v, *, causal, bias, scale) -> (out (B, Hq, Lq, D) in q's dtype,
                                                 lse (B, Hq, Lq) float32, natural log)
    backward(dout, q, k, v, out, lse, *, causal, bias, scale) -> (dq, dk, dv)

`causal` is only ever passed with Lq == Lk (where top-left and bottom-right alignment agree;
other causal cases reach a kernel as a bias). `bias` is None or an additive (B or 1, 1, Lq, Lk)
tensor of 0 / -inf in q's dtype, built by the composition with `bias_align` padding. `backward`
receives the *merged* out and lse of the whole call, never the part's own, and must use them as
given (every kernel here recomputes its probabilities as exp(s - lse) and its delta from dout and
out). A kernel with `native_gqa` False gets k and v with as many heads as q.

`reasons(dtype, D, device)` says why a kernel cannot run on this device, dtype and head dim
([] when it can); the composition asks it once per kind of call.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

import torch

HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Kernel:
    name: str
    reasons: Callable  # (dtype, D, device) -> list[str]
    forward: Callable
    backward: Callable
    takes_causal: bool = True  # takes causal as a flag (square calls only, see above)
    takes_bias: bool = True
    native_gqa: bool = True
    bias_align: int = 1  # the bias's last dim is allocated as a multiple of this
    deterministic: bool = True  # its backward gives the same bits run to run
    # the prefix part's backward, where the kernel's own backward is not the best way to it:
    # (dout, q, out, lse, pk, pv, scale, key_mask) -> (dq, dpk, dpv), q (n, Hq, Lq, D), pk (Hkv, P, D)
    prefix_backward: Optional[Callable] = None


def _capability(device: torch.device) -> tuple[int, int]:
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


@lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _cuda_reasons(device, min_capability=(8, 0)) -> list:
    if device.type != "cuda":
        return [f"runs on CUDA tensors, got {device.type}"]
    if torch.version.hip:
        return ["not wired for ROCm"]
    try:
        cap = _capability(device)
    except Exception as exc:  # a CPU-only torch asked about a CUDA problem; a broken driver
        return [f"could not query the GPU ({type(exc).__name__}: {exc})"]
    if cap < min_capability:
        return [f"needs compute capability >= {min_capability[0]}.{min_capability[1]}, this GPU has {cap[0]}.{cap[1]}"]
    return []


# ---- ATen's CPU flash kernel (the one SDPA uses on a CPU): every dtype, GQA, a bias --------------


def _cpu_reasons(dtype, D, device) -> list:
    return [] if device.type == "cpu" else [f"ATen's CPU flash kernel runs on CPU tensors, got {device.type}"]


def _cpu_forward(q, k, v, *, causal, bias, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                      scale=scale)


def _cpu_backward(dout, q, k, v, out, lse, *, causal, bias, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale)


# Rows of the prefix part's backward handled at once: its (Hq, rows, P) scores and their
# gradient take 2 * 4 * Hq * rows * P bytes, 32 MiB at this budget.
PREFIX_BWD_SCORES = 1 << 22


def _rows_per_head(x):
    """(n, Hq, Lq, X) -> (Hq, n * Lq, X): each head's query rows. A view when x's memory is
    (n, Lq, Hq, X), which is transformers' layout and this package's outputs' and gradients';
    otherwise one copy."""
    n, H, L, X = x.shape
    return x.transpose(1, 2).reshape(n * L, H, X).transpose(0, 1)


def _cpu_prefix_backward(dout, q, out, lse, prefix_k, prefix_v, scale, key_mask):
    """The prefix part's gradients on a CPU, as explicit products: each head's query rows of all
    n requests are one (n * Lq, D) matrix (a view in transformers' layout), so the products
    themselves reduce dK/dV over the requests, and no request gets a copy of the prefix. With the
    merged lse and delta = rowsum(dout * out): p = exp(s - lse), dv = p^T dout,
    ds = p * (dout v^T - delta), dk = scale * ds^T q, dq = scale * ds k. Cheaper on a CPU than the
    flash kernel's backward at small P (benchmarks/NOTES.md). Returns dq (n, Hq, Lq, D) and
    dpk, dpv (Hkv, P, D), float32."""
    n, Hq, Lq, D = q.shape
    Hkv, P, _ = prefix_k.shape
    group = Hq // Hkv
    f32 = torch.float32
    # (Hq, P, D): per head, not per request. The scale multiplies the product, not pk: that is
    # the fused forward's order, so these scores are its scores to the bit wherever the products
    # agree and p = exp(s - lse) sums to 1 (with pk pre-scaled, the gradients failed the accuracy
    # rule from logits ~300 on; measured, fp32, 4 of 4 seeds).
    pk = prefix_k.to(f32).repeat_interleave(group, 0)
    pv = prefix_v.to(f32).repeat_interleave(group, 0)
    Q, dO = _rows_per_head(q), _rows_per_head(dout)  # (Hq, n * Lq, D)
    lse_rows = lse.transpose(0, 1).reshape(Hq, n * Lq, 1)
    # rowsum(dout * out) over dense memory, then the (small) per-row result rearranged
    delta_rows = (dout.to(f32) * out.to(f32)).sum(-1).transpose(0, 1).reshape(Hq, n * Lq, 1)
    key_bias = None
    if key_mask is not None:
        key_bias = torch.zeros(P, dtype=f32, device=q.device).masked_fill(~key_mask, float("-inf"))
    dQ = torch.empty(n, Lq, Hq, D, dtype=f32, device=q.device)
    dQ_rows = _rows_per_head(dQ.transpose(1, 2))
    dpk = torch.zeros(Hq, P, D, dtype=f32, device=q.device)
    dpv = torch.zeros_like(dpk)
    step = max(1, PREFIX_BWD_SCORES // (Hq * P))
    for a in range(0, n * Lq, step):
        rows = slice(a, a + step)
        Qc, dOc = Q[:, rows].to(f32), dO[:, rows].to(f32)
        s = torch.bmm(Qc, pk.transpose(1, 2)).mul_(scale)
        if key_bias is not None:
            s.add_(key_bias)
        p = s.sub_(lse_rows[:, rows]).exp_()  # (Hq, c, P)
        dpv.baddbmm_(p.transpose(1, 2), dOc)
        ds = p.mul_(torch.bmm(dOc, pv.transpose(1, 2)).sub_(delta_rows[:, rows]))
        dpk.baddbmm_(ds.transpose(1, 2), Qc)
        dQ_rows[:, rows] = torch.bmm(ds, pk).mul_(scale)
    return (dQ.transpose(1, 2), (dpk * scale).view(Hkv, group, P, D).sum(1), dpv.view(Hkv, group, P, D).sum(1))


ATEN_CPU = Kernel("aten_cpu_flash", _cpu_reasons, _cpu_forward, _cpu_backward, prefix_backward=_cpu_prefix_backward)


# ---- ATen's CUDA flash kernel (FlashAttention 2 inside torch): fp16/bf16, no bias, GQA ----------


def _aten_flash_reasons(dtype, D, device) -> list:
    why = _cuda_reasons(device)
    if why:
        return why
    if not torch.backends.cuda.is_flash_attention_available():
        why.append("this torch was built without its flash-attention kernel")
    if dtype not in HALF:
        why.append(f"flash attention takes float16/bfloat16, got {dtype}")
    if D % 8 or D > 256:
        why.append(f"flash attention takes a head dim that is a multiple of 8 up to 256, got {D}")
    return why


def _no_rng(device):
    """The philox seed and offset the flash and efficient backwards read only with dropout."""
    return torch.empty(2, dtype=torch.uint64, device=device), torch.empty((), dtype=torch.uint64, device=device)


def _aten_flash_forward(q, k, v, *, causal, bias, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    return out, lse


def _aten_flash_backward(dout, q, k, v, out, lse, *, causal, bias, scale):
    seed, offset = _no_rng(q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal, seed, offset,
        scale=scale)


ATEN_FLASH = Kernel("aten_flash", _aten_flash_reasons, _aten_flash_forward, _aten_flash_backward,
                    takes_bias=False)


# ---- ATen's CUDA memory-efficient kernel: every dtype, a bias; no GQA (k, v expanded) ------------


def _aten_efficient_reasons(dtype, D, device) -> list:
    why = _cuda_reasons(device, min_capability=(5, 0))
    if why:
        return why
    if _deterministic_requested():
        why.append("its backward accumulates with atomics, and torch.use_deterministic_algorithms(True) is set")
    align = 4 if dtype == torch.float32 else 8
    if D % align:
        why.append(f"the memory-efficient kernel takes a head dim that is a multiple of {align} in {dtype}, got {D}")
    return why


def _padded_lse(lse):
    """lse (B, H, L) in the (B, H, ceil(L / 32) * 32) buffer the efficient kernel's backward reads."""
    B, H, L = lse.shape
    buf = lse.new_zeros(B, H, -(-L // 32) * 32)
    buf[..., :L] = lse
    return buf


def _expanded_bias(bias, q, k):
    return None if bias is None else bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _aten_efficient_forward(q, k, v, *, causal, bias, scale):
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, _expanded_bias(bias, q, k), True, 0.0, causal, scale=scale)[:2]
    return out, lse[..., :q.shape[2]]


def _aten_efficient_backward(dout, q, k, v, out, lse, *, causal, bias, scale):
    seed = torch.empty((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, _expanded_bias(bias, q, k), out, _padded_lse(lse), seed, seed, 0.0,
        [True, True, True, False], causal, scale=scale)
    return dq, dk, dv


ATEN_EFFICIENT = Kernel("aten_efficient", _aten_efficient_reasons, _aten_efficient_forward,
                        _aten_efficient_backward, native_gqa=False, bias_align=16, deterministic=False)


# ---- ATen's cuDNN kernel: fp16/bf16, head dim <= 128; no bias, k and v expanded for GQA here ----
# (cuDNN's own GQA and bias support depend on the cuDNN and torch versions; not relied on.)


def _deterministic_requested() -> bool:
    return torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()


def _aten_cudnn_reasons(dtype, D, device) -> list:
    why = _cuda_reasons(device)
    if why:
        return why
    if not torch.backends.cudnn.is_available() or (torch.backends.cudnn.version() or 0) < 90000:
        why.append("needs cuDNN >= 9 with this torch")
    if dtype not in HALF:
        why.append(f"cuDNN attention takes float16/bfloat16, got {dtype}")
    if D % 8 or D > 128:
        why.append(f"cuDNN attention is used here for head dims that are multiples of 8 up to 128, got {D}")
    if _deterministic_requested():
        why.append("its backward is not promised deterministic, and torch.use_deterministic_algorithms(True) is set")
    return why


def _aten_cudnn_forward(q, k, v, *, causal, bias, scale):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                  scale=scale)[:2]
    return out, lse.reshape(lse.shape[:3])  # cuDNN's lse is (B, H, L, 1)


def _aten_cudnn_backward(dout, q, k, v, out, lse, *, causal, bias, scale):
    seed, offset = (torch.empty((), dtype=torch.int64, device=q.device) for _ in range(2))
    if dout.stride() != out.stride():  # cuDNN reads dO with O's strides
        dout = torch.empty_like(out).copy_(dout)
    # None passes an undefined tensor: no bias, and dense (not nested) inputs for cum_seq_q/k
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.contiguous().unsqueeze(-1), seed, offset, None, None, None, q.shape[2], k.shape[2],
        0.0, causal, scale=scale)


ATEN_CUDNN = Kernel("aten_cudnn", _aten_cudnn_reasons, _aten_cudnn_forward, _aten_cudnn_backward,
                    takes_bias=False, native_gqa=False, deterministic=False)


# ---- the flash_attn package (FlashAttention 2, >= 2.7): fp16/bf16, no bias, GQA -----------------

FLASH_ATTN_MIN = (2, 7)  # the release whose _flash_attn_forward / _backward take the arguments below


@lru_cache(maxsize=None)
def _flash_attn_interface():
    """(module, None) or (None, why it is unusable)."""
    try:
        package = importlib.import_module("flash_attn")
        interface = importlib.import_module("flash_attn.flash_attn_interface")
    except Exception as exc:  # absent, or built for another torch
        return None, f"flash_attn is not importable ({type(exc).__name__}: {exc})"
    version = tuple(int(p) for p in package.__version__.split("+")[0].split(".")[:2])
    if version < FLASH_ATTN_MIN:
        return None, f"flash_attn {package.__version__} is older than {FLASH_ATTN_MIN[0]}.{FLASH_ATTN_MIN[1]}"
    return interface, None


def _flash_attn_reasons(dtype, D, device) -> list:
    why = _cuda_reasons(device)
    if why:
        return why
    interface, missing = _flash_attn_interface()
    if interface is None:
        return [missing]
    if dtype not in HALF:
        why.append(f"flash_attn takes float16/bfloat16, got {dtype}")
    if D % 8 or D > 256:
        why.append(f"flash_attn takes a head dim that is a multiple of 8 up to 256, got {D}")
    return why


def _blhd(x):
    return x.transpose(1, 2)  # the package's (B, L, H, D): a view of ours


def _flash_attn_forward(q, k, v, *, causal, bias, scale):
    interface, _ = _flash_attn_interface()
    out, lse, _, _ = interface._flash_attn_forward(
        _blhd(q), _blhd(k), _blhd(v), dropout_p=0.0, softmax_scale=scale, causal=causal, window_size_left=-1,
        window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False)
    return out.transpose(1, 2), lse


def _flash_attn_backward(dout, q, k, v, out, lse, *, causal, bias, scale):
    interface, _ = _flash_attn_interface()
    dq, dk, dv = (torch.empty_like(_blhd(x)) for x in (q, k, v))
    interface._flash_attn_backward(
        _blhd(dout), _blhd(q), _blhd(k), _blhd(v), _blhd(out), lse.contiguous(), dq, dk, dv, dropout_p=0.0,
        softmax_scale=scale, causal=causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
        alibi_slopes=None, deterministic=torch.are_deterministic_algorithms_enabled(), rng_state=None)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


FLASH_ATTN = Kernel("flash_attn", _flash_attn_reasons, _flash_attn_forward, _flash_attn_backward, takes_bias=False)


# Preference order on CUDA: the flash_attn package where installed, ATen's flash kernel, cuDNN's
# (reached where flash declines; PREFIX_KERNELS_COMPOSED_KERNELS puts it first, for the benchmark
# to measure), then the memory-efficient kernel (the one that takes a bias: kv_mask,
# prefix_mask, non-square causal). Not here: FlashAttention 3 (flash_attn_interface), whose
# low-level forward/backward arguments change between releases (docs/backends.md).
CUDA_ORDER = (FLASH_ATTN, ATEN_FLASH, ATEN_CUDNN, ATEN_EFFICIENT)
CPU_ORDER = (ATEN_CPU,)
BY_NAME = {k.name: k for k in (ATEN_CPU, FLASH_ATTN, ATEN_FLASH, ATEN_CUDNN, ATEN_EFFICIENT)}
