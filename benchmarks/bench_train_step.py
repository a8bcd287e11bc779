"""End to end: one prefix-tuning training step on a Llama-shaped model, stock PEFT against patched.

Providers (each reported as skipped with its reason when it cannot run):
  peft_sdpa        stock PEFT prefix tuning on SDPA attention (the prefix copied per request)
  peft_eager       stock PEFT prefix tuning on eager attention
  prefix_kernels   the same model after prefix_kernels.apply_prefix_kernels(), backend "auto": what
                   a user gets (on CUDA the faster of composed and triton per train_choice.json,
                   composed before any GPU has measured)
  prefix_kernels_triton, prefix_kernels_composed
                   the same patched model with PREFIX_KERNELS_BACKEND=triton or =composed set
                   around each of its steps (the variable overrides "auto" for the patched
                   attention): the Triton kernels; vendor kernels for the prefix and the own part,
                   merged by log-sum-exp. Skipped with the reason where the backend is unknown or
                   declines the model's cases

Shapes from the integration issue: a Llama-3.2-1B-shaped model from a config (random weights,
bf16), B=16, L=512, P in {16, 64, 256}. A step is forward + backward + AdamW on the prefix
parameters. Every provider's model (the same weights: one seed) is built for a P, and their
steps are alternated (round i starts with provider i mod n, and no provider runs twice in a row:
timing.alternated), `--warmup` untimed rounds and then `--steps` timed ones (default 20, so that
p20 and p80 are read from at least 4 steps each side), with CUDA synchronisation around each
step; so the machine's drift lands on all of them. Each row records the median, p20 and p80,
the steps, and `step_log`: the provider of every timed step of its P in the order they ran.
tokens/s counts the B x L own tokens. Peak memory (GPU): max_memory_allocated during a step
minus what was allocated before it (weights, optimizer state and the other providers' models
excluded), the largest over the timed steps. apply_prefix_kernels() is called once: its patches
act only on models whose attention is "prefix_kernels", so the stock models run PEFT's own code.

    python benchmarks/bench_train_step.py             # GPU, full shapes
    python benchmarks/bench_train_step.py --smoke     # CPU, tiny model (keeps the script from rotting)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import Progress, environment, positive_int  # noqa: E402
from timing import alternated, quantiles  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "train_step.jsonl"
PROVIDERS = ("peft_sdpa", "peft_eager", "prefix_kernels", "prefix_kernels_triton", "prefix_kernels_composed")
# --smoke without --providers: the stock and "auto" providers (the Triton kernels run under the
# interpreter on a CPU, slowly; a backend still being written may decline there: name them with
# --providers to smoke them too).
SMOKE_PROVIDERS = ("peft_sdpa", "peft_eager", "prefix_kernels")
BACKEND_VARIABLE = "PREFIX_KERNELS_BACKEND"
# the variable's value around the provider's steps
BACKEND_OF = {"prefix_kernels_triton": "triton", "prefix_kernels_composed": "composed"}
GPU_PEAK = ("max_memory_allocated during a step minus memory_allocated before it "
            "(weights, optimizer state and the other providers' models excluded)")
ORDER = "alternated: round i starts with provider i mod n, no provider twice in a row (timing.round_order)"

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=101)


def build(provider: str, model_cfg: dict, P: int, device, dtype):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=4096, **model_cfg)
    config._attn_implementation = {"peft_sdpa": "sdpa", "peft_eager": "eager"}.get(provider, "prefix_kernels")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    peft_cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
                                  encoder_hidden_size=512)
    return get_peft_model(model, peft_cfg).to(device=device, dtype=dtype)


@contextlib.contextmanager
def backend_variable(value: str | None):
    """PREFIX_KERNELS_BACKEND set to value for the block (unchanged when value is None)."""
    if value is None:
        yield
        return
    before = os.environ.get(BACKEND_VARIABLE)
    os.environ[BACKEND_VARIABLE] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(BACKEND_VARIABLE, None)
        else:
            os.environ[BACKEND_VARIABLE] = before


def step_fn(model, batch, backend: str | None = None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with backend_variable(backend):
            model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(model_cfg, B, L, prefixes, providers, device, dtype, steps, results: Path, smoke: bool = False,
        warmup: int = 3) -> list[dict]:
    import prefix_kernels

    env = environment(device, smoke)
    cuda = device.type == "cuda"
    progress = Progress(results, len(prefixes) * len(providers), "train_step")
    prefix_kernels.apply_prefix_kernels()  # acts only on the models built with "prefix_kernels" attention
    try:
        for P in prefixes:
            g = torch.Generator().manual_seed(P)
            ids = torch.randint(0, model_cfg["vocab_size"], (B, L), generator=g)
            batch = {"input_ids": ids.to(device), "attention_mask": torch.ones(B, L, dtype=torch.long, device=device),
                     "labels": ids.to(device)}
            shape = dict(B=B, L=L, P=P, layers=model_cfg["num_hidden_layers"], hidden=model_cfg["hidden_size"],
                         Hq=model_cfg["num_attention_heads"], Hkv=model_cfg["num_key_value_heads"])
            rows, live = {}, {}
            for provider in providers:
                rows[provider] = dict(workload="train_step", mode="fwd_bwd_adamw", provider=provider, shape=shape,
                                      dtype=str(dtype).replace("torch.", ""), **env)
                if provider in BACKEND_OF:
                    rows[provider]["backend_env"] = {BACKEND_VARIABLE: BACKEND_OF[provider]}
                try:
                    live[provider] = step_fn(build(provider, model_cfg, P, device, dtype), batch,
                                             BACKEND_OF.get(provider))
                except Exception as exc:  # reported, not dropped
                    rows[provider].update(status="skipped", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            log: list = []
            times, peaks, failed = alternated(live, device, steps, warmup, log=log)
            for provider, exc in failed.items():
                rows[provider].update(status="skipped", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            for provider in (p for p in live if p not in failed):
                med, lo, hi = quantiles(times[provider])
                rows[provider].update(status="ok", median_ms=med, p20_ms=lo, p80_ms=hi, steps=len(times[provider]),
                                      warmup=warmup, order=ORDER, step_log=log, tokens_per_s=B * L / (med * 1e-3),
                                      peak_mib=peaks[provider] if cuda else None)
                if cuda:
                    rows[provider]["peak_what"] = GPU_PEAK
            del live
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            for provider in providers:
                progress.add(rows[provider], _line(P, rows[provider]))
    finally:
        progress.close()
        prefix_kernels.revert_prefix_kernels()
    return progress.rows


def _line(P: int, row: dict) -> str:
    head = f"P={P:4d} {row['provider']:23s} "
    if row.get("status") != "ok":
        return head + f"skipped: {row['reason'].splitlines()[0]}"
    return head + (f"{row['median_ms']:9.1f} ms (p20 {row['p20_ms']:.1f}, p80 {row['p80_ms']:.1f}, "
                   f"{row['steps']} steps) {row['tokens_per_s']:9.0f} tok/s " + (
                       f"{row['peak_mib']:8.0f} MiB" if row["peak_mib"] is not None else "peak memory not measured"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON-lines file to upsert rows into")
    ap.add_argument("--providers", nargs="*", default=None, choices=list(PROVIDERS),
                    help=f"default: all; with --smoke {' '.join(SMOKE_PROVIDERS)}")
    ap.add_argument("--steps", type=positive_int, default=None,
                    help="timed steps per provider, alternated (default 20; --smoke 5)")
    ap.add_argument("--warmup", type=positive_int, default=None,
                    help="untimed rounds first (default 3; --smoke 1)")
    args = ap.parse_args(argv)
    if args.smoke:
        providers = args.providers if args.providers is not None else list(SMOKE_PROVIDERS)
        return run(TINY, 2, 16, (4,), providers, torch.device("cpu"), torch.float32, args.steps or 5, args.out,
                   smoke=True, warmup=args.warmup or 1)
    if not torch.cuda.is_available():
        ap.error("no CUDA device: run with --smoke on a CPU")
    providers = args.providers if args.providers is not None else list(PROVIDERS)
    return run(LLAMA_1B, 16, 512, (16, 64, 256), providers, torch.device("cuda"), torch.bfloat16,
               args.steps or 20, args.out, warmup=args.warmup or 3)


if __name__ == "__main__":
    main()
