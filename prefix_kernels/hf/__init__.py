"""transformers + PEFT integration (needs the `hf` extra: transformers, and peft for PEFT models).

    prefix_kernels.apply_prefix_kernels()      # before building the model / PEFT wrapper
    prefix_kernels.apply_prefix_kernels(model) # or on an existing model or PeftModel
    prefix_kernels.revert_prefix_kernels()

Layers, top to bottom: patch.py (what is patched, and undone), prompt.py (prompt tuning at
batch 1), delivery.py (decoder-stack hook that hands the prefix to the attention), attention.py
(the AttentionInterface function and mask builder), cache.py (PrefixCache).
"""

from .cache import PrefixCache, PrefixLayer, SharedPrefix
from .completion import CompletionOutput, completion_logits, distinct_prompts
from .generate import generate
from .patch import apply_prefix_kernels, revert_prefix_kernels, uses_prefix_kernels

__all__ = ["CompletionOutput", "PrefixCache", "PrefixLayer", "SharedPrefix", "apply_prefix_kernels",
           "completion_logits", "distinct_prompts", "generate", "revert_prefix_kernels", "uses_prefix_kernels"]
