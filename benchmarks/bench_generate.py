"""End to end: generation with a shared prompt, stock `model.generate` against `prefix_kernels.generate`.

Modes (the row's `mode`):
  sample   N samples from one prompt (best-of-n, RL rollouts), sampling with a fixed seed
  system   N different requests (own_len / 2 to own_len tokens, left-padded) behind one shared
           system or few-shot prompt, greedy

Providers (each reported as skipped with its reason when it cannot run):
  hf_generate_sdpa          `model.generate` on SDPA attention: sample, `num_return_sequences=N`
                            (the prompt is encoded N times and each sample decodes against its own
                            copy); system, the N full prompts (shared + own) as one padded batch
  prefix_kernels_generate   `prefix_kernels.generate(model, prompt, num_return_sequences=N)` or
                            `prefix_kernels.generate(model, own, own_mask, shared_prefix=prompt)`:
                            the shared prompt is encoded once and its K/V kept once for the batch

Shapes from the decoding issue: a Llama-3.2-1B-shaped model from a config (hidden 2048, 16 layers,
32 heads / 8 kv heads, intermediate 8192, vocab 128256, random weights, bf16), one 2048-token prompt,
N = 64 samples of 256 new tokens each (sampling with a fixed seed, min_new_tokens = max_new_tokens
so every run produces the same number of tokens). Timing: wall clock around the whole generate call
with CUDA synchronisation, median over `--repeats` runs after one warm-up run; tokens/s counts the
N x new tokens produced; peak memory is torch.cuda.max_memory_allocated over the timed runs (model
weights included). `tokens_match_hf` on the prefix_kernels row says whether its samples were
token-identical to the stock ones for the same seed (informative: in bf16 a different but equally
valid reduction order can flip a sampled token).

    python benchmarks/bench_generate.py             # GPU, full shapes
    python benchmarks/bench_generate.py --smoke     # CPU, tiny model (keeps the script from rotting)
    python benchmarks/bench_generate.py --cpu       # CPU, a 4-layer model, fp32: 16 samples of 32
                                                    # tokens from one 512-token prompt, and 16
                                                    # requests of <= 32 tokens behind it (a minute)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import Progress, environment, positive_int  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "generate.jsonl"
PROVIDERS = ("hf_generate_sdpa", "prefix_kernels_generate")
MODES = ("sample", "system")

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)
# --cpu: a model small enough for a 2-core CPU, with the same GQA ratio (4 query heads per kv head).
CPU_SMALL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=8192)
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=101)
SEED = 1234


def build(model_cfg: dict, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=4096, **model_cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def make_inputs(mode: str, vocab: int, prompt_len: int, own_len: int, N: int, device):
    """sample: one (1, prompt_len) prompt. system: a (1, prompt_len) shared prompt and N requests of
    own_len // 2 to own_len tokens each, left-padded to (N, own_len), with their mask."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, prompt_len), generator=g).to(device)
    if mode == "sample":
        return (prompt,)
    own = torch.randint(3, vocab, (N, own_len), generator=g)
    lengths = torch.randint(max(1, own_len // 2), own_len + 1, (N,), generator=g)
    mask = (torch.arange(own_len)[None, :] >= own_len - lengths[:, None]).long()
    return prompt, (own * mask).to(device), mask.to(device)


def generate_fn(provider: str, model, mode: str, inputs, N: int, new_tokens: int):
    import prefix_kernels

    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    if mode == "sample":
        (prompt,) = inputs
        kw.update(num_return_sequences=N, do_sample=True, top_k=50)
    else:  # greedy: a batch of different requests, each answered once
        prompt, own, own_mask = inputs
        full = torch.cat([prompt.expand(own.shape[0], -1), own], dim=1)
        full_mask = torch.cat([torch.ones_like(prompt).expand(own.shape[0], -1), own_mask], dim=1)
        kw.update(do_sample=False)

    def run():
        torch.manual_seed(SEED)
        with torch.no_grad():
            if provider == "hf_generate_sdpa" and mode == "sample":
                return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kw)
            if provider == "hf_generate_sdpa":
                return model.generate(input_ids=full, attention_mask=full_mask, **kw)
            if provider == "prefix_kernels_generate" and mode == "sample":
                return prefix_kernels.generate(model, prompt, **kw)
            if provider == "prefix_kernels_generate":
                return prefix_kernels.generate(model, own, own_mask, shared_prefix=prompt, **kw)
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")

    return run


def measure(fn, device, repeats: int, warmup: int = 1):
    cuda = device.type == "cuda"
    times, out = [], None
    for i in range(warmup + repeats):
        if i == warmup and cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return out, statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5]


def run(model_cfg, prompt_len, samples, new_tokens, providers, device, dtype, repeats, results: Path,
        modes=("sample",), own_len: int = 32, smoke: bool = False) -> list[dict]:
    import prefix_kernels

    env = environment(device, smoke)
    progress = Progress(results, len(modes) * len(samples) * len(providers), "generate")
    for mode, N in [(m, n) for m in modes for n in samples]:
        inputs = make_inputs(mode, model_cfg["vocab_size"], prompt_len, own_len, N, device)
        expected = (N, prompt_len + (own_len if mode == "system" else 0) + new_tokens)
        reference = None
        for provider in providers:
            shape = dict(B=N, prompt=prompt_len, new=new_tokens, layers=model_cfg["num_hidden_layers"],
                         hidden=model_cfg["hidden_size"], Hq=model_cfg["num_attention_heads"],
                         Hkv=model_cfg["num_key_value_heads"], vocab=model_cfg["vocab_size"])
            if mode == "system":
                shape["own"] = own_len
            row = dict(workload="generate", mode=mode, provider=provider, shape=shape,
                       dtype=str(dtype).replace("torch.", ""), **env)
            model = None
            try:
                prefix_kernels.revert_prefix_kernels()
                model = build(model_cfg, device, dtype)
                out, med, lo, hi = measure(generate_fn(provider, model, mode, inputs, N, new_tokens), device, repeats)
                if tuple(out.shape) != expected:
                    raise RuntimeError(f"generated {tuple(out.shape)}, expected {expected}")
                row.update(status="ok", median_ms=med, p20_ms=lo, p80_ms=hi,
                           tokens_per_s=N * new_tokens / (med * 1e-3),
                           peak_mib=(torch.cuda.max_memory_allocated(device) / 2**20
                                     if device.type == "cuda" else None))
                if provider == "hf_generate_sdpa":
                    reference = out.cpu()
                elif reference is not None:
                    row["tokens_match_hf"] = bool(torch.equal(out.cpu(), reference))
                del out
            except Exception as exc:  # reported, not dropped
                row.update(status="skipped", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            progress.add(row, f"{mode:6s} N={N:4d} {provider:24s} " + (
                f"{row['median_ms']:10.1f} ms {row['tokens_per_s']:9.0f} tok/s "
                + (f"{row['peak_mib']:8.0f} MiB" if row["peak_mib"] is not None else "  (no peak memory on CPU)")
                + (f" match_hf={row['tokens_match_hf']}" if "tokens_match_hf" in row else "")
                if row["status"] == "ok" else f"skipped: {row['reason']}"))
    progress.close()
    prefix_kernels.revert_prefix_kernels()
    return progress.rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--cpu", action="store_true", help="a small model on the CPU (hidden 512, 4 layers, 512-token prompt)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON-lines file to upsert rows into")
    ap.add_argument("--providers", nargs="*", default=list(PROVIDERS), choices=list(PROVIDERS))
    ap.add_argument("--samples", type=positive_int, nargs="*", default=None,
                    help="numbers of samples N to sweep (default: 64 on GPU, 16 with --cpu, 4 with --smoke)")
    ap.add_argument("--repeats", type=positive_int, default=3, help="timed runs per provider after one warm-up run")
    ap.add_argument("--modes", nargs="*", choices=MODES, default=None,
                    help="sample: N samples from one prompt; system: N different requests behind one shared "
                         "prompt, greedy (default: sample on a GPU, both on a CPU)")
    args = ap.parse_args(argv)
    if args.smoke:
        return run(TINY, 8, args.samples or [4], 4, args.providers, torch.device("cpu"), torch.float32,
                   min(args.repeats, 2), args.out, args.modes or MODES, own_len=5, smoke=True)
    if args.cpu:
        return run(CPU_SMALL, 512, args.samples or [16], 32, args.providers, torch.device("cpu"), torch.float32,
                   args.repeats, args.out, args.modes or MODES)
    if not torch.cuda.is_available():
        ap.error("no CUDA device: run with --smoke or --cpu on a CPU")
    return run(LLAMA_1B, 2048, args.samples or [64], 256, args.providers, torch.device("cuda"), torch.bfloat16,
               args.repeats, args.out, args.modes or ("sample",))


if __name__ == "__main__":
    main()
