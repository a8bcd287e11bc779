"""The accuracy rule shared by the tests and `prefix-kernels verify` (FlashAttention's rule).

For a quantity x (out, lse, or a gradient), with `truth` the float64 reference on the same inputs
and `same` the plain-PyTorch reference computed in the inputs' dtype:

    max|x - truth| <= 2 * max|same - truth| + floor,
    floor = FLOOR_REL[dtype] * eps(dtype) * max|truth| + FLOOR_ABS[dtype] * eps(dtype)

The floor only guards against a same-dtype error that is by luck tiny; it is orders of magnitude
below what a mis-masked key or a dropped prefix block produces.
"""

from __future__ import annotations

import torch

# float32: the plain fp32 reference is sometimes lucky (a prefix gradient summed over ~1000 rows
# can be 10x more accurate than a correct fp32 kernel); over 300 random shapes a correct kernel
# needed up to ~18 eps * max|truth| beyond 2x the reference error, hence 64 eps (7.6e-6
# relative), still >10x below a 1e-4 change of the scale. Half types: 2 eps = one more rounding.
FLOOR_REL = {torch.float32: 64.0, torch.float16: 2.0, torch.bfloat16: 2.0}
# Multiples of eps(dtype), absolute. float32: where every query row sees exactly one key (P = 1
# and no own key, or the reverse), p = 1 and the gradients of q and k are exactly 0 by cancellation,
# ds = dp - delta with dp = dout . v and delta = dout . out = dout . v. The plain fp32 reference
# forms both with the same product, so it gets exactly 0 and the relative floor is 0 too; a correct
# kernel forms them in two summation orders and leaves rounding: measured up to 13.6 eps (torch
# backend, D = 256) and 8.5 eps (triton, D <= 64) over 10 seeds, with randn inputs. Half types: the
# plain reference rounds there as well, so the 2x term covers it.
FLOOR_ABS = {torch.float32: 32.0, torch.float16: 0.05, torch.bfloat16: 0.05}


def _max_abs(x: torch.Tensor) -> float:
    return 0.0 if x.numel() == 0 else float(x.abs().max())


def measure(x: torch.Tensor, same: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype):
    """(err, err_same, bound): x passes when err <= bound (and err is finite)."""
    x, same, truth = (t.detach().double() for t in (x, same, truth))
    err, err_same = _max_abs(x - truth), _max_abs(same - truth)
    e = torch.finfo(dtype).eps
    floor = FLOOR_REL[dtype] * e * _max_abs(truth) + FLOOR_ABS[dtype] * e
    return err, err_same, 2.0 * err_same + floor
