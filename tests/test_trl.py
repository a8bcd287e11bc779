"""TRL's GRPO, RLOO and DPO log-probabilities with each distinct prompt run once.

A tiny Llama from a config (random weights, saved to a temporary folder because the trainers reload
their reference model from the policy's path) and a word-level tokenizer built here; nothing is
downloaded. The log-probabilities, entropies and losses of the patched trainers, and the gradients
of every trainable parameter, are compared with stock TRL on a model with eager attention on the
same batch. Tolerance: twice the gap between two stock attention implementations (eager and SDPA)
on that batch, at most 1e-5 for log-probabilities and losses and 1e-4 (relative to a gradient's
largest entry) for gradients; GRPO's group-normalised advantages cancel most of the gradient and
amplify rounding in every implementation alike.
"""

from __future__ import annotations

import os

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import prefix_kernels  # noqa: E402
from prefix_kernels.hf import trl as shared_trl  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")
WORDS = ("the a cat dog sat ran on under mat rug house tree big small red blue green quick slow jumped over "
         "and then it was very good bad yes no one two three four five six seven eight nine ten").split()
PROMPTS = ["the cat sat on", "a dog ran under the big", "one two", "red blue green and then it was"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<bos>", eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab) + 4, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("trl") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


class _TorchChunkedLogProb:
    """TRL 1.15's output layer launches a Triton kernel even for CPU tensors (1.16 computes such tiles
    in torch): this stand-in computes the same per-token fields in torch, so that the integration
    runs on 1.15's own code paths on a CPU."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
              outputs=("log_probs",)):
        z = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        lp = torch.log_softmax(z / temperature, -1)
        logp = lp.gather(-1, targets[:, None]).squeeze(-1)
        entropy = -(lp.exp() * lp).sum(-1) if "entropy" in outputs else None
        sq = torch.logsumexp(2 * lp, -1).detach() if "log_sum_sq_probs" in outputs else None
        mean = (z / temperature).mean(-1).detach() if "mean_logits" in outputs else None
        top1 = (z.argmax(-1) == targets) if "is_top1" in outputs else None
        return logp, entropy, sq, mean, top1


@pytest.fixture(autouse=True, scope="module")
def cpu_output_layer():
    from trl.trainer import utils

    if hasattr(utils, "_use_triton") or torch.cuda.is_available():
        yield
        return
    original, utils._ChunkedLogProbFunction = utils._ChunkedLogProbFunction, _TorchChunkedLogProb
    yield
    utils._ChunkedLogProbFunction = original


@pytest.fixture(autouse=True)
def patched():
    prefix_kernels.apply_prefix_kernels()
    yield
    prefix_kernels.revert_prefix_kernels()


def common(tmp_path, **kw):
    return dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, fp16=False, report_to="none",
                max_steps=1, logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0,
                gradient_checkpointing=False, **kw)


def load(model_dir, attn):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn)


def rl_batch(tokenizer, G=2, K=6, seed=0):
    """What GRPO/RLOO hand their log-prob function: left-padded prompts, G completions each,
    right-padded, rows permuted as after TRL's shuffle."""
    g = torch.Generator().manual_seed(seed)
    enc = tokenizer(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    B = len(PROMPTS) * G
    order = torch.randperm(B, generator=g)
    prompt_ids = enc.input_ids.repeat_interleave(G, 0)[order]
    prompt_mask = enc.attention_mask.repeat_interleave(G, 0)[order]
    completion = torch.randint(4, len(WORDS) + 4, (B, K), generator=g)
    lengths = torch.randint(1, K + 1, (B,), generator=g)
    completion_mask = (torch.arange(K)[None] < lengths[:, None]).long()
    completion = completion.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    return torch.cat([prompt_ids, completion], 1), torch.cat([prompt_mask, completion_mask], 1), K


def rl_logps(trainer, model, ids, mask, K, share: bool):
    shared_trl._enabled = share
    try:
        logps, entropy, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, K, compute_entropy=True)
    finally:
        shared_trl._enabled = True
    return logps, entropy


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_grads(ours, stock, gap):
    assert ours.keys() == stock.keys() and ours
    for name, g in stock.items():
        err = float((ours[name] - g).abs().max())
        scale = float(g.abs().max())
        assert err <= min(max(2 * gap, 1e-6), 1e-4) * scale + 1e-8, f"{name}: {err} against {scale}"


def _stock_twin(trainer, model_dir, attn):
    """The trainer's policy weights on a stock attention, with TRL's fused head as the trainer set it."""
    from trl.trainer.utils import add_fused_lm_head

    twin = load(model_dir, attn)
    twin.load_state_dict(trainer.model.state_dict())
    add_fused_lm_head(twin, temperature=trainer.temperature, outputs=("log_probs", "entropy"))
    return twin


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_rl_logps_entropies_and_gradients_match_stock(kind, model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    if kind == "grpo":
        args = trl.GRPOConfig(**common(tmp_path, per_device_train_batch_size=4, num_generations=2,
                                       max_completion_length=6, temperature=0.7, beta=0.0,
                                       model_init_kwargs={"attn_implementation": "prefix_kernels"}))
        trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=lambda completions, **k: [0.0] * len(completions),
                                  args=args, train_dataset=ds, processing_class=tokenizer)
    else:
        args = trl.RLOOConfig(**common(tmp_path, per_device_train_batch_size=4, num_generations=2,
                                       max_completion_length=6, temperature=0.9, beta=0.0,
                                       model_init_kwargs={"attn_implementation": "prefix_kernels"}))
        trainer = trl.RLOOTrainer(model=model_dir, reward_funcs=lambda completions, **k: [0.0] * len(completions),
                                  args=args, train_dataset=ds, processing_class=tokenizer)
    model = trainer.model
    assert model.config._attn_implementation == "prefix_kernels"
    ids, mask, K = rl_batch(tokenizer)
    weights = torch.randn(ids.shape[0], K, generator=torch.Generator().manual_seed(1))

    before = dict(shared_trl.stats)
    logps, entropy = rl_logps(trainer, model, ids, mask, K, share=True)
    assert shared_trl.stats["shared_calls"] == before["shared_calls"] + 1  # prompts were shared
    ((logps * weights).sum() + entropy.sum()).backward()
    ours = grads_of(model)

    results = {}
    for attn in ("eager", "sdpa"):
        twin = _stock_twin(trainer, model_dir, attn)
        lp, ent = rl_logps(trainer, twin, ids, mask, K, share=False)
        ((lp * weights).sum() + ent.sum()).backward()
        results[attn] = (lp.detach(), ent.detach(), grads_of(twin))
    gap = float((results["eager"][0] - results["sdpa"][0]).abs().max())
    tol = min(max(2 * gap, 1e-6), 1e-5)
    valid = mask[:, -K:].bool()
    assert float((logps.detach() - results["eager"][0])[valid].abs().max()) <= tol
    assert float((entropy.detach() - results["eager"][1])[valid].abs().max()) <= tol
    assert torch.all(logps.detach()[~valid] == 0)
    assert_close_grads(ours, results["eager"][2], gap)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_loss_and_gradients_match_stock(model_dir, tmp_path, lora):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ds = datasets.Dataset.from_dict({
        "prompt": ["the cat sat on", "a dog ran under the big", "one two three", "red blue"],
        "chosen": [" the mat", " tree", " four five", " green and then"],
        "rejected": [" a rug", " house and then it", " six", " yes"],
    })

    def trainer_for(attn):
        args = trl.DPOConfig(**common(tmp_path, per_device_train_batch_size=4, max_length=64,
                                      model_init_kwargs={"attn_implementation": attn}))
        peft_config = None
        if lora:  # the reference is the same model with the adapter off
            peft = pytest.importorskip("peft")
            peft_config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                          init_lora_weights=False)
        torch.manual_seed(7)  # the same adapter weights for every trainer
        return trl.DPOTrainer(model=model_dir, args=args, train_dataset=ds, processing_class=tokenizer,
                              peft_config=peft_config)

    ours = trainer_for("prefix_kernels")
    batch = ours.data_collator([ours.train_dataset[i] for i in range(4)])
    before = dict(shared_trl.stats)
    loss, _ = ours._compute_loss(ours.model, batch, return_outputs=True)
    assert shared_trl.stats["shared_calls"] >= before["shared_calls"] + 1  # the policy's call shared prompts
    loss.backward()
    results = {}
    for attn in ("eager", "sdpa"):
        stock = trainer_for(attn)
        stock_loss, _ = stock._compute_loss(stock.model, batch, return_outputs=True)
        stock_loss.backward()
        results[attn] = (float(stock_loss), grads_of(stock.model))
    gap = abs(results["eager"][0] - results["sdpa"][0])
    assert abs(float(loss) - results["eager"][0]) <= min(max(2 * gap, 1e-6), 1e-5)
    assert_close_grads(grads_of(ours.model), results["eager"][1], gap)


def test_grpo_training_step_with_lora_shares_prompts(model_dir, tmp_path):
    """A whole GRPO step (generation, old-policy pass, LoRA policy, reference with the adapter off)
    with the settings that keep a prompt's completions in one micro-batch."""
    peft = pytest.importorskip("peft")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    args = trl.GRPOConfig(**common(tmp_path, per_device_train_batch_size=4, num_generations=2, steps_per_generation=1,
                                   max_completion_length=5, beta=0.04,
                                   model_init_kwargs={"attn_implementation": "prefix_kernels"}))
    trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=lambda completions, **k: [float(len(c)) for c in completions],
                              args=args, train_dataset=ds, processing_class=tokenizer,
                              peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                          task_type="CAUSAL_LM"))
    before = dict(shared_trl.stats)
    trainer.train()
    assert shared_trl.stats["shared_calls"] > before["shared_calls"]
    assert shared_trl.stats["prompt_tokens_saved"] > before["prompt_tokens_saved"]
    assert all(torch.isfinite(torch.tensor(h.get("loss", 0.0))) for h in trainer.state.log_history)


def test_revert_restores_trl():
    from trl.trainer import utils

    assert getattr(utils.add_fused_lm_head, "_prefix_kernels_original", None) is not None
    prefix_kernels.revert_prefix_kernels()
    assert getattr(utils.add_fused_lm_head, "_prefix_kernels_original", None) is None
    import trl.trainer.grpo_trainer as grpo

    assert grpo.add_fused_lm_head is utils.add_fused_lm_head
