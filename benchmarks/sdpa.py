"""Which SDPA backend a baseline runs on, chosen once and pinned, so that its rows say what ran.

torch's scaled_dot_product_attention picks a kernel per call from what the inputs allow (a bool
mask rules out FlashAttention; some head dims, dtypes or GPUs rule out others) and says nothing
of the choice. A baseline row that does not name its kernel cannot be compared fairly, and the
choice could change between the warm-up and the timing. So each SDPA provider tries the backends
in ORDER with torch.nn.attention.sdpa_kernel, each on the step exactly as it will be timed
(forward, or forward and backward), takes the first that runs, and is timed (and captured in a
CUDA graph) pinned to it. The row records `sdpa_backend` and, for every backend tried before it,
why it declined (torch's warnings and error).
"""

from __future__ import annotations

import warnings

import torch

# Tried in this order: the fused kernels first (FlashAttention-2, then memory-efficient, then
# cuDNN's), the unfused math path last.
ORDER = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def _reason(exc: Exception, caught) -> str:
    said = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, UserWarning)]
    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return "; ".join(dict.fromkeys(said + [text]))[:400]


def pick_backend(step, device) -> tuple[str, callable, dict]:
    """(name, context factory pinning it, {backend tried before it: why it declined}) for the
    first backend in ORDER that runs step(); RuntimeError naming every reason when none does."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    declined = {}
    for name in ORDER:
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            declined[name] = "not in this torch"
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(backend):
                    step()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
            except RuntimeError as exc:
                declined[name] = _reason(exc, caught)
                continue
        return name, (lambda: sdpa_kernel(backend)), declined
    raise RuntimeError("no SDPA backend runs this case: " + "; ".join(f"{n}: {why}" for n, why in declined.items()))


def fields(name: str, declined: dict) -> dict:
    """The row's record of the choice."""
    return dict(sdpa_backend=name, sdpa_order=list(ORDER), sdpa_declined=declined)

