"""prefix_kernels: attention kernels that read a shared prefix once across the batch.

Prefix-tuning, P-tuning v2, prompt-tuning and shared-prompt decoding attend every request to the
same prefix. `shared_prefix_attention` computes that without copying the prefix per request,
forward and backward (the prefix gradient is reduced across the batch inside the kernel).
"""

from .dispatch import NoBackendError
from .ops import shared_prefix_attention

__version__ = "0.1.0"

__all__ = ["shared_prefix_attention", "NoBackendError", "__version__"]
