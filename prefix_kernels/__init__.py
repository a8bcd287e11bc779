"""prefix_kernels: attention kernels that read a shared prefix once across the batch.

Prefix-tuning, P-tuning v2, prompt-tuning and shared-prompt decoding attend every request to the
same prefix. `shared_prefix_attention` computes that without copying the prefix per request,
forward and backward (the prefix gradient is reduced across the batch inside the kernel).
`shared_prefix_decode` is its inference-only decode step (1 to 16 new tokens per request).
"""

from .dispatch import NoBackendError
from .decode import shared_prefix_decode
from .ops import shared_prefix_attention

__version__ = "0.1.0"

__all__ = ["shared_prefix_attention", "shared_prefix_decode", "NoBackendError", "__version__"]
