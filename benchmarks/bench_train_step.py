"""End to end: one prefix-tuning training step on a Llama-shaped model, stock PEFT against patched.

Providers (each reported as skipped with its reason when it cannot run):
  peft_sdpa        stock PEFT prefix tuning on SDPA attention (the prefix copied per request)
  peft_eager       stock PEFT prefix tuning on eager attention
  prefix_kernels   the same model after prefix_kernels.apply_prefix_kernels()

Shapes from the integration issue: a Llama-3.2-1B-shaped model from a config (random weights,
bf16), B=16, L=512, P in {16, 64, 256}. A step is forward + backward + AdamW on the prefix
parameters; timing is the median over `--steps` steps after warm-up, with CUDA synchronisation;
tokens/s counts the B x L own tokens; peak memory is torch.cuda.max_memory_allocated.

    python benchmarks/bench_train_step.py             # GPU, full shapes
    python benchmarks/bench_train_step.py --smoke     # CPU, tiny model (keeps the script from rotting)
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

RESULTS = Path(__file__).resolve().parent / "results" / "train_step.jsonl"
PROVIDERS = ("peft_sdpa", "peft_eager", "prefix_kernels")

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=101)


def build(provider: str, model_cfg: dict, P: int, device, dtype):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import prefix_kernels

    if provider == "prefix_kernels":
        prefix_kernels.apply_prefix_kernels()
    else:
        prefix_kernels.revert_prefix_kernels()
    config = LlamaConfig(max_position_embeddings=4096, **model_cfg)
    config._attn_implementation = {"peft_sdpa": "sdpa", "peft_eager": "eager"}.get(provider, "prefix_kernels")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    peft_cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
                                  encoder_hidden_size=512)
    return get_peft_model(model, peft_cfg).to(device=device, dtype=dtype)


def step_fn(model, batch):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(step, device, steps: int, warmup: int = 3) -> tuple[float, float, float]:
    cuda = device.type == "cuda"
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5]


def run(model_cfg, B, L, prefixes, providers, device, dtype, steps, results: Path, smoke: bool = False) -> list[dict]:
    env = environment(device, smoke)
    progress = Progress(results, len(prefixes) * len(providers), "train_step")
    for P in prefixes:
        g = torch.Generator().manual_seed(P)
        ids = torch.randint(0, model_cfg["vocab_size"], (B, L), generator=g)
        batch = {"input_ids": ids.to(device), "attention_mask": torch.ones(B, L, dtype=torch.long, device=device),
                 "labels": ids.to(device)}
        for provider in providers:
            shape = dict(B=B, L=L, P=P, layers=model_cfg["num_hidden_layers"], hidden=model_cfg["hidden_size"],
                         Hq=model_cfg["num_attention_heads"], Hkv=model_cfg["num_key_value_heads"])
            row = dict(workload="train_step", mode="fwd_bwd_adamw", provider=provider, shape=shape,
                       dtype=str(dtype).replace("torch.", ""), **env)
            try:
                model = build(provider, model_cfg, P, device, dtype)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                med, lo, hi = measure(step_fn(model, batch), device, steps)
                row.update(status="ok", median_ms=med, p20_ms=lo, p80_ms=hi, tokens_per_s=B * L / (med * 1e-3),
                           peak_mib=(torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None))
                del model
            except Exception as exc:  # reported, not dropped
                row.update(status="skipped", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            progress.add(row, f"P={P:4d} {provider:15s} " + (
                f"{row['median_ms']:9.1f} ms {row['tokens_per_s']:9.0f} tok/s " + (
                    f"{row['peak_mib']:8.0f} MiB" if row["peak_mib"] is not None else "peak memory not measured")
                if row["status"] == "ok" else f"skipped: {row['reason']}"))
    progress.close()
    import prefix_kernels

    prefix_kernels.revert_prefix_kernels()
    return progress.rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON-lines file to upsert rows into")
    ap.add_argument("--providers", nargs="*", default=list(PROVIDERS), choices=list(PROVIDERS))
    ap.add_argument("--steps", type=positive_int, default=10, help="timed steps after warm-up")
    args = ap.parse_args(argv)
    if args.smoke:
        return run(TINY, 2, 16, (4,), args.providers, torch.device("cpu"), torch.float32, 2, args.out, smoke=True)
    if not torch.cuda.is_available():
        ap.error("no CUDA device: run with --smoke on a CPU")
    return run(LLAMA_1B, 16, 512, (16, 64, 256), args.providers, torch.device("cuda"), torch.bfloat16,
               args.steps, args.out)


if __name__ == "__main__":
    main()
