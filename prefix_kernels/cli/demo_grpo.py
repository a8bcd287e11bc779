"""`prefix-kernels demo --task grpo`: a GRPO-style policy-gradient run, stock and with shared prompts.

Each step takes 2 prompts of the shipped table-to-text data (a few-shot prompt: worked examples,
then the table to describe) and 8 completions per prompt, scores them with a toy reward (word
overlap with the table's reference sentence), normalises the rewards within each prompt's group
(GRPO's advantages) and takes a policy-gradient step on the completion tokens' log-probabilities.
The completions are drawn from the data (the reference and other rows' sentences) rather than
sampled from the model: a random model's samples teach nothing, and fixed samples make the two
runs see the same batches. Stock runs the concatenated rows (prompt + completion) on SDPA;
patched runs `prefix_kernels.completion_logits`, each prompt once. Both start from the same
weights: the loss curves must agree; the table shows step time, tokens per second and memory,
the steps of the two models alternated in one process as in the prefix-tuning demo.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..data import load_e2e
from .demo import (BOS, EOS, PAD, SEP, DemoConfig, WordTokenizer, _in_child, alternate, llama, quiet, run_steps,
                   summarise)

GROUPS, SAMPLES, SHOTS = 2, 8, 4  # prompts per step, completions per prompt, worked examples per prompt


def make_steps(cfg: DemoConfig, rows, tok: WordTokenizer) -> list:
    """Per step: left-padded prompts (GROUPS * SAMPLES rows, each prompt repeated), right-padded
    completions and their group-normalised advantages."""
    g = torch.Generator().manual_seed(cfg.seed)
    steps = []
    for _ in range(cfg.steps):
        prompts, completions, rewards = [], [], []
        for _ in range(GROUPS):
            shots = torch.randint(0, len(rows), (SHOTS + 1,), generator=g).tolist()
            prompt = [BOS]
            for i in shots[:-1]:
                prompt += tok.encode(rows[i]["table"]) + [SEP] + tok.encode(rows[i]["text"]) + [EOS]
            target = rows[shots[-1]]
            prompt += tok.encode(target["table"]) + [SEP]
            picks = [shots[-1]] + torch.randint(0, len(rows), (SAMPLES - 1,), generator=g).tolist()
            reference = set(tok.encode(target["text"]))
            for i in picks:
                completion = tok.encode(rows[i]["text"]) + [EOS]
                prompts.append(prompt)
                completions.append(completion)
                rewards.append(len(reference & set(completion)) / max(1, len(set(completion))))
        rewards = torch.tensor(rewards).view(GROUPS, SAMPLES)
        advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
        Lp, Lc = max(map(len, prompts)), max(map(len, completions))
        n = len(prompts)
        prompt_ids, prompt_mask = torch.full((n, Lp), PAD), torch.zeros((n, Lp), dtype=torch.long)
        comp_ids, comp_mask = torch.full((n, Lc), PAD), torch.zeros((n, Lc), dtype=torch.long)
        for b, (p, c) in enumerate(zip(prompts, completions)):
            prompt_ids[b, Lp - len(p):], prompt_mask[b, Lp - len(p):] = torch.tensor(p), 1
            comp_ids[b, :len(c)], comp_mask[b, :len(c)] = torch.tensor(c), 1
        steps.append(dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=comp_ids,
                          completion_mask=comp_mask, advantages=advantages))
    return steps


def policy_loss(model, step: dict, patched: bool) -> torch.Tensor:
    """-(advantage x log-prob of each completion token), averaged over the completion tokens."""
    cmask = step["completion_mask"].bool()
    if patched:
        import prefix_kernels

        logits = prefix_kernels.completion_logits(model, step["prompt_ids"], step["completion_ids"],
                                                  prompt_mask=step["prompt_mask"], completion_mask=cmask).logits
    else:
        Lp = step["prompt_ids"].shape[1]
        logits = model(input_ids=torch.cat([step["prompt_ids"], step["completion_ids"]], 1),
                       attention_mask=torch.cat([step["prompt_mask"], step["completion_mask"]], 1)).logits[:, Lp - 1:-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, step["completion_ids"][..., None]).squeeze(-1)
    return -(step["advantages"].to(logp.device)[:, None] * logp * cmask).sum() / cmask.sum()


def _tokens(step: dict) -> int:
    return int(step["prompt_mask"].sum() + step["completion_mask"].sum())


def train(cfg: DemoConfig, patched: bool, queue=None, progress: bool = True) -> dict:
    with quiet():
        rows = load_e2e()
        tok = WordTokenizer(rows)
        model = llama(cfg, patched, len(tok), max_positions=1024)
        result = run_steps(cfg, model, make_steps(cfg, rows, tok),
                           lambda m, step: policy_loss(m, step, patched), _tokens,
                           "patched" if patched else "stock  ", progress)
    if queue is not None:
        queue.put(result)
    return result


def interleaved_seconds(cfg: DemoConfig, progress: bool = True) -> dict:
    with quiet():
        rows = load_e2e()
        tok = WordTokenizer(rows)
        steps = make_steps(cfg, rows, tok)
        models = {name: llama(cfg, name == "patched", len(tok), max_positions=1024) for name in ("stock", "patched")}
        return alternate(cfg, models, steps, policy_loss, len(steps), progress)


def config_for(device: str, steps: int | None) -> DemoConfig:
    """The prefix-tuning demo's model; 12 steps by default on a CPU (about a minute each way), 20 on a GPU."""
    if steps is None:
        steps = 20 if device.startswith("cuda") else 12
    return replace(DemoConfig.for_device(device, steps), lr=1e-4, batch_size=GROUPS * SAMPLES, prefix=0)


def format_report(cfg: DemoConfig, stock: dict, ours: dict, summary: dict, rows_tokens: tuple) -> str:
    prompt_tokens, completion_tokens = rows_tokens
    mem = "peak GPU memory allocated" if cfg.device.startswith("cuda") else "peak RSS of the process"
    lines = [
        f"GRPO-style policy gradient, Llama shape {cfg.layers} layers x {cfg.hidden} hidden, {cfg.heads} heads / "
        f"{cfg.kv_heads} kv heads, {stock['params'] / 1e6:.1f}M parameters, {cfg.dtype}, {GROUPS} prompts x "
        f"{SAMPLES} completions per step (~{prompt_tokens} prompt and ~{completion_tokens} completion tokens per row), "
        f"on {cfg.device}",
        "",
        f"{'step':>4}  {'stock loss':>11}  {'patched loss':>12}  {'abs diff':>9}",
    ]
    n = len(stock["losses"])
    for i in sorted(set(range(0, n, max(1, n // 10))) | {n - 1}):
        a, b = stock["losses"][i], ours["losses"][i]
        lines.append(f"{i + 1:>4}  {a:>11.5f}  {b:>12.5f}  {abs(a - b):>9.1e}")
    diff = max(abs(a - b) for a, b in zip(stock["losses"], ours["losses"]))
    lines += [
        "",
        f"{'':24}{'stock (concatenated)':>22}{'patched':>12}",
        f"{'median step (ms)':24}{summary['stock_ms']:>22.1f}{summary['patched_ms']:>12.1f}"
        "   (steps of the two models alternated, same batches)",
        f"{'tokens / s (all rows)':24}{summary['stock_tok_s']:>22.0f}{summary['patched_tok_s']:>12.0f}",
        f"{mem[:24]:24}{summary['stock_peak_mib']:>18.0f} MiB{summary['patched_peak_mib']:>8.0f} MiB",
        "",
        f"loss curves agree: max absolute difference {diff:.1e} over {n} steps (the losses are near 0: GRPO's "
        f"advantages sum to 0 in each group); patched step {summary['speedup']:.2f}x the speed of stock",
    ]
    return "\n".join(lines)


def run_demo(device: str | None = None, steps: int | None = None) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = config_for(device, steps)
    stock = _in_child(cfg, patched=False, target=train)
    ours = _in_child(cfg, patched=True, target=train)
    timing = interleaved_seconds(cfg)
    summary = summarise(cfg, stock, ours, timing=timing)
    rows = load_e2e()
    first = make_steps(replace(cfg, steps=1), rows, WordTokenizer(rows))[0]
    n = first["prompt_mask"].shape[0]
    print(format_report(cfg, stock, ours, summary, (int(first["prompt_mask"].sum()) // n,
                                                      int(first["completion_mask"].sum()) // n)))
    return {"summary": summary, "stock": stock, "patched": ours}
