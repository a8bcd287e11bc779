"""prefix_kernels: attention kernels that read a shared prefix once across the batch.

Prefix-tuning, P-tuning v2, prompt-tuning and shared-prompt decoding attend every request to the
same prefix. `shared_prefix_attention` computes that without copying the prefix per request,
forward and backward (the prefix gradient is reduced across the batch inside the kernel).
`shared_prefix_decode` is its inference-only decode step (1 to 16 new tokens per request).
"""

from .api import NoBackendError, shared_prefix_attention, shared_prefix_decode

__version__ = "0.1.0"

# The transformers integration needs transformers (the "hf" extra): imported when first used.


def apply_prefix_kernels(model=None):
    """Route transformers/PEFT attention through the shared-prefix kernels (see prefix_kernels.hf).

    Call once before building a model with ``attn_implementation="prefix_kernels"``, or pass an
    existing transformers model or PeftModel. Needs transformers (the ``hf`` extra)."""
    from .hf import apply_prefix_kernels as apply

    return apply(model)


def generate(model, input_ids, attention_mask=None, *, shared_prefix=None, num_return_sequences=None, **generate_kwargs):
    """model.generate with a prompt shared by every sequence computed once and kept once (see
    prefix_kernels.hf.generate): N samples from one prompt, or a batch behind a common prompt."""
    from .hf import generate as hf_generate

    return hf_generate(model, input_ids, attention_mask, shared_prefix=shared_prefix,
                       num_return_sequences=num_return_sequences, **generate_kwargs)


def completion_logits(model, prompt_ids, completion_ids, *, prompt_mask=None, completion_mask=None,
                      prompt_index=None, position_ids=None, return_logits=True, return_hidden_states=False):
    """Logits (B, Lc, V) of every completion token with each distinct prompt run once, forward and
    backward, equal to the stock forward over the concatenated rows (GRPO, RLOO, DPO; see
    prefix_kernels.hf.completion)."""
    from .hf import completion_logits as shared

    return shared(model, prompt_ids, completion_ids, prompt_mask=prompt_mask, completion_mask=completion_mask,
                  prompt_index=prompt_index, position_ids=position_ids, return_logits=return_logits,
                  return_hidden_states=return_hidden_states)


def revert_prefix_kernels():
    """Undo apply_prefix_kernels: PEFT methods restored, hooks removed, models switched back."""
    from .hf import revert_prefix_kernels as revert

    return revert()


__all__ = ["shared_prefix_attention", "shared_prefix_decode", "apply_prefix_kernels", "completion_logits", "generate",
           "revert_prefix_kernels", "NoBackendError", "__version__"]
