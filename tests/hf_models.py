"""Tiny random-initialised models built from configs (nothing is downloaded), and the comparison
of a patched PEFT model against stock PEFT with eager attention on the same weights and batch."""

from __future__ import annotations

import torch

VOCAB = 101


def tiny_config(model_type: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=VOCAB, max_position_embeddings=128)
    llama_like = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, **common)
    configs = {
        "llama": lambda: tf.LlamaConfig(**llama_like),
        "mistral": lambda: tf.MistralConfig(**dict(llama_like, sliding_window=4096)),
        "qwen2": lambda: tf.Qwen2Config(**llama_like),
        # Qwen3: head_dim 24 differs from hidden / heads = 16
        "qwen3": lambda: tf.Qwen3Config(**dict(llama_like, head_dim=24)),
        "gemma": lambda: tf.GemmaConfig(**dict(llama_like, head_dim=16)),
        "gemma2": lambda: tf.Gemma2Config(**dict(llama_like, head_dim=16, sliding_window=4096)),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
        "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, max_position_embeddings=128, hidden_size=64, ffn_dim=96,
                                    num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                                    dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=2,
                                    eos_token_id=2),
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, max_position_embeddings=128, hidden_size=64,
                                             intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                             rotary_pct=0.5, attention_dropout=0.0, hidden_dropout=0.0),
    }
    config = configs[model_type]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_model(model_type: str, attn: str, dtype=torch.float32, seed: int = 0, **overrides):
    """`dtype=` is what from_config takes from transformers 4.56 on (`torch_dtype` before, deprecated since)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation=attn,
                                             dtype=dtype)
    return model


def peft_version() -> tuple:
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("peft")).release


def _prefix_dims(config) -> dict:
    """Prefix sizes for PEFT < 0.18, which derives them from hidden_size / num_attention_heads and
    ignores config.head_dim (wrong for Qwen3 here: head_dim 24, 64 / 4 = 16). These are the sizes
    PEFT >= 0.18 derives itself; newer PEFT is left to derive them, as users do."""
    head_dim = getattr(config, "head_dim", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    if peft_version() >= (0, 18) or head_dim is None or kv_heads is None:
        return {}
    return dict(token_dim=head_dim * kv_heads, num_attention_heads=kv_heads)


def peft_config(method: str, P: int = 5, projection: bool = False, model_config=None):
    import peft

    if method == "prefix":
        dims = _prefix_dims(model_config) if model_config is not None else {}
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                       encoder_hidden_size=32, **dims)
    if method == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    if method == "ptuning":
        return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=32)
    raise ValueError(method)


def build_peft(model_type: str, attn: str, method: str = "prefix", P: int = 5, projection: bool = False,
               dtype=torch.float32, gradient_checkpointing: bool = False, **overrides):
    import peft

    model = build_model(model_type, attn, dtype=dtype, **overrides)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, peft_config(method, P, projection, model.config))
    pm.to(dtype)
    return pm


def batch(B: int = 3, L: int = 9, padding: str = "left", seed: int = 2, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    lengths = [L, max(1, L - 4), max(1, L - 1)][:B] + [L] * max(0, B - 3)
    for b, n in enumerate(lengths):
        if padding == "left":
            mask[b, : L - n] = 0
        elif padding == "right":
            mask[b, n:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :2] = -100  # a prompt part that is not trained on
    return ids.to(device), mask.to(device), labels.to(device)


def loss_and_grads(pm, ids, mask, labels):
    pm.train()
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad(set_to_none=True)
    return out.loss.detach(), grads, out


def assert_matches(stock, patched, loss_rtol=1e-5, grad_rtol=1e-4):
    """loss relative error <= loss_rtol; every trainable parameter's gradient: max|diff| / max|ref| <= grad_rtol."""
    (l0, g0), (l1, g1) = stock[:2], patched[:2]
    rel = float((l0 - l1).abs() / l0.abs())
    assert rel <= loss_rtol, f"loss {float(l1)} vs stock {float(l0)}: relative error {rel:.2e}"
    assert g0.keys() == g1.keys()
    for name in g0:
        ref = g0[name].double()
        err = float((g1[name].double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        assert err <= grad_rtol, f"{name}: gradient relative error {err:.2e} > {grad_rtol}"
