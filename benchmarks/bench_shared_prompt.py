"""End to end: one log-prob training step where G completions share each prompt (GRPO, RLOO, DPO).

A step is what a GRPO-style trainer does with a batch of rollouts: the logits of every completion
token, the log-probability of each completion token (cross-entropy in the logits' dtype), a
policy-gradient loss -sum(logp * advantage * mask) / sum(mask) in float32 with a random advantage
per completion, and its backward through every parameter (then the gradients are dropped).

Providers (each reported as skipped with its reason when it cannot run):
  stock_sdpa       the stock forward over the concatenated (B, Lp + Lc) rows on SDPA attention,
                   every prompt copied once per completion; logits_to_keep = Lc + 1 as TRL passes
                   it (the same logits as slicing the full ones [:, Lp - 1:-1], without the
                   prompt positions' output layer)
  prefix_grouper   the `prefix_grouper` package (PyPI prefix-grouper 0.0.1.post1) as its README
                   shows for GRPO: PrefixGrouper.from_ungrouped_masks(prompt_mask, completion_mask,
                   group_sizes=G, padding_mode="right"), concat_input for the ids and for the
                   positions (each completion's continue after its prompt's, as the stock rows
                   have them), the model called with prefix_grouper=..., split_output(logits,
                   include_prefix_last=1) and convert_padding for the targets. Attention through
                   the package's own transformers registration (register_attention(),
                   attn_implementation "prefix_grouper_attention"), which splits each layer's
                   attention into the prompts' self-attention and the completions' attention over
                   [prompt K/V copied per completion (batch_repeat_cat); own K/V], and calls the
                   attention function named by prefix_grouper_attn_func with a 2-D padding mask.
                   transformers' "sdpa" cannot take that mask (RuntimeError: the size of tensor a
                   must match the size of tensor b), and "eager" is no registered function, so an
                   SDPA adapter is registered (as the README's "adapter function for
                   dimension/parameter alignment"): GQA heads repeated as transformers' SDPA path
                   does under a mask, the padding mask and a causal mask aligned bottom-right (a
                   completion query sees its whole prompt), padded query rows let see every key
                   (their output is dropped) so that no row is NaN
  prefix_kernels   prefix_kernels.completion_logits(model, prompt rows (B, Lp), completions, masks):
                   the distinct prompts found by one sort, each run once, the completions against
                   their prompt's keys and values as a shared prefix

Batch: `--prompts` distinct prompts (default 2) of Lp = 512 tokens, G completions each (G = 2 is
DPO's chosen/rejected pair), Lc in {128, 512}; B = prompts x G rows. With padding (the default;
--no-padding turns it off), prompt i holds Lp - i * Lp / 8 tokens, left-padded, and each
completion Lc / 2 to Lc tokens, right-padded (the first one full): what RL trainers hold. Token
ids, lengths and advantages come from a seed per shape; the model is Llama-shaped with random
weights from one seed, the same for every provider.

Measured: median and 20/80-percentile ms of `--steps` timed steps (default 10) after `--warmup`
untimed ones, the providers alternated step by step (round i starts with provider i mod 3), so
that the machine's drift lands on all of them; CUDA synchronised around each step. tokens_per_s
counts the completion tokens of the batch (padding excluded; `tokens_counted` says so in the row).
Peak memory (peak_mib): on a GPU, torch.cuda.max_memory_allocated during a step minus what was
allocated before it (the largest over the timed steps: activations, logits, gradients; weights
excluded); on a CPU, the peak RSS during one more (untimed) step minus the RSS before it, with
the heap trimmed first (glibc malloc_trim; VmHWM reset through /proc/self/clear_refs): without
the trim, memory freed by the previous step stays resident and the next step reuses it unseen
(measured: the same step read 0 MiB untrimmed, 12 MiB trimmed, as in a fresh process).

Outputs checked against stock: each provider's logits on the valid completion tokens are
compared with stock_sdpa's (max_abs_logit_diff) and with a reference, the stock forward with the
same (rounded) weights in a wider dtype (float64 for float32 runs, float32 for bfloat16):
`matches_stock` is true when a provider's error against the reference is at most twice stock's
own plus eps(dtype) * max|reference| (the FlashAttention rule of the op's tests). A provider that
does not match runs and is timed, its row flagged (matches_stock: false; the headline leaves it
out). For prefix_kernels `shared` says whether completion_logits ran the prompts once (false:
it fell back to the stock forward, with a warning).

    python benchmarks/bench_shared_prompt.py            # GPU: Llama-3.2-1B shape, bf16
    python benchmarks/bench_shared_prompt.py --cpu      # CPU: 2 layers x 256 hidden, fp32
    python benchmarks/bench_shared_prompt.py --smoke    # CPU, tiny model (keeps the script from rotting)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import Progress, environment, positive_int  # noqa: E402
from timing import alternated, quantiles  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "shared_prompt.jsonl"
PROVIDERS = ("stock_sdpa", "prefix_grouper", "prefix_kernels")
MODE = "logprob_fwd_bwd"
TOKENS_COUNTED = "completion tokens (padding excluded)"
GPU_PEAK = "max_memory_allocated during a step minus memory_allocated before it (weights excluded)"
CPU_PEAK = "peak RSS during one untimed step minus the RSS before it, the heap trimmed first (weights excluded)"

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)
# --cpu: one step of each provider at each of the six shapes took 22 s on 2 cores (x86-64, fp32;
# stock 13 s, of which 6.8 s at G = 16, Lc = 512), so the whole run (1 warm-up, 10 timed and 1
# memory step each, the output checks) takes about 5 minutes; with 4 layers it would take 10-11.
CPU_SMALL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1024)
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=101)

GROUPS, PROMPT_LEN, COMPLETION_LENS, PROMPTS = (2, 8, 16), 512, (128, 512), 2

# prefix_grouper: the package's transformers registration, and the SDPA adapter it calls
PG_ATTENTION = "prefix_grouper_attention"          # registered by prefix_grouper.utils.register_transformers
PG_ADAPTER = "prefix_grouper_bench_sdpa_adapter"   # registered here (see the module docstring)
PG_REQUIREMENT = "prefix-grouper==0.0.1.post1"


# ---------------------------------------------------------------- inputs and models


def make_batch(G: int, Lp: int, Lc: int, prompts: int, vocab: int, padded: bool, device) -> dict:
    """The distinct prompts (prompts, Lp) left-padded with their masks, `index` (B,) naming each
    row's prompt (grouped: G rows per prompt, as TRL repeats them), completions (B, Lc)
    right-padded with their masks, and an advantage per completion. Same seed, same batch."""
    g = torch.Generator().manual_seed(7919 * G + 31 * Lp + Lc + 1000003 * prompts)
    B = prompts * G
    prompt_ids = torch.randint(3, vocab, (prompts, Lp), generator=g)
    plen = torch.tensor([max(1, Lp - (i * Lp) // 8) if padded else Lp for i in range(prompts)])
    pmask = torch.arange(Lp)[None, :] >= (Lp - plen)[:, None]
    completion_ids = torch.randint(3, vocab, (B, Lc), generator=g)
    if padded:
        clen = torch.randint(max(1, Lc // 2), Lc + 1, (B,), generator=g)
        clen[0] = Lc
    else:
        clen = torch.full((B,), Lc)
    cmask = torch.arange(Lc)[None, :] < clen[:, None]
    advantages = torch.randn(B, generator=g)
    batch = dict(prompt_ids=prompt_ids * pmask, prompt_mask=pmask, index=torch.arange(prompts).repeat_interleave(G),
                 completion_ids=completion_ids * cmask, completion_mask=cmask, advantages=advantages)
    return {k: v.to(device) for k, v in batch.items()}


def register_prefix_grouper() -> None:
    """prefix_grouper's own transformers attention ("prefix_grouper_attention") and the SDPA
    adapter it is told to call (prefix_grouper_attn_func)."""
    from prefix_grouper.utils.register_transformers import register_attention
    from transformers import AttentionInterface

    register_attention()
    AttentionInterface.register(PG_ADAPTER, _prefix_grouper_sdpa)


def _prefix_grouper_sdpa(module, query, key, value, padding_mask, *args, dropout=0.0, scaling=None, **kwargs):
    """What PrefixGrouper calls for each part (the prompts' self-attention; the completions over
    [prompt; own] keys): q (b, Hq, Lq, D), k/v (b, Hkv, Lk, D), padding_mask (b, Lk) bool whose
    last Lq columns are the queries'. Causal aligned bottom-right; returns (b, Lq, Hq, D)."""
    Lq, Lk = query.shape[2], key.shape[2]
    repeat = query.shape[1] // key.shape[1]
    if repeat > 1:  # as transformers' SDPA path does under a mask
        key = key.repeat_interleave(repeat, dim=1)
        value = value.repeat_interleave(repeat, dim=1)
    mask = padding_mask.to(device=query.device, dtype=torch.bool)
    causal = (torch.arange(Lk, device=query.device)[None, :]
              <= torch.arange(Lq, device=query.device)[:, None] + (Lk - Lq))
    allowed = causal[None, None] & mask[:, None, None, :]
    allowed = allowed | ~mask[:, None, -Lq:, None]  # padded query rows: every key (output dropped, no NaN)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def build(provider: str, model_cfg: dict, device, dtype):
    """The model a provider runs: the same random weights (one seed) for every provider."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import prefix_kernels

    if provider == "prefix_kernels":
        prefix_kernels.apply_prefix_kernels()
        impl = "prefix_kernels"
    elif provider == "prefix_grouper":
        try:
            register_prefix_grouper()
        except ImportError as exc:
            raise ImportError(f"prefix_grouper is not installed ({exc}): pip install {PG_REQUIREMENT} "
                              "(or pip install '.[bench]')") from None
        impl = PG_ATTENTION
    elif provider == "stock_sdpa":
        impl = "sdpa"
    else:
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
    config = LlamaConfig(max_position_embeddings=4096, **model_cfg)
    config._attn_implementation = impl
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.train()


# ---------------------------------------------------------------- providers


def logits_fn(provider: str, model, batch: dict):
    """() -> (logits (B, W, V), targets (B, W), mask (B, W)): logits[:, t] predicts targets[:, t],
    W = Lc (prefix_grouper: the longest completion). The per-batch preparation is inside."""
    import prefix_kernels

    prompts, pmask, index = batch["prompt_ids"], batch["prompt_mask"], batch["index"]
    comp, cmask = batch["completion_ids"], batch["completion_mask"]
    Lp, Lc = prompts.shape[1], comp.shape[1]

    if provider == "stock_sdpa":
        def run():
            ids = torch.cat([prompts[index], comp], 1)
            mask = torch.cat([pmask[index], cmask], 1).long()
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=Lc + 1).logits[:, :-1]
            return logits, comp, cmask
    elif provider == "prefix_kernels":
        state = {}

        def run():
            out = prefix_kernels.completion_logits(model, prompts[index], comp, prompt_mask=pmask[index],
                                                   completion_mask=cmask)
            state["shared"] = out.shared
            return out.logits, comp, cmask
        run.state = state
    elif provider == "prefix_grouper":
        from prefix_grouper import PrefixGrouper

        G = int(index.shape[0]) // prompts.shape[0]
        prompt_pos = torch.arange(Lp, device=prompts.device).expand(prompts.shape[0], -1)
        comp_pos = torch.arange(Lp, Lp + Lc, device=prompts.device).expand(comp.shape[0], -1)

        def run():
            pg = PrefixGrouper.from_ungrouped_masks(prefix_mask=pmask, suffix_mask=cmask, group_sizes=G,
                                                    padding_mode="right", device=prompts.device)
            ids = pg.concat_input(prompts, pmask, comp, cmask)
            pos = pg.concat_input(prompt_pos, pmask, comp_pos, cmask)
            out = model(input_ids=ids, attention_mask=pg.padding_mask, position_ids=pos, prefix_grouper=pg,
                        prefix_grouper_attn_func=PG_ADAPTER)
            _, _, suffix, suffix_mask = pg.split_output(out.logits, include_prefix_last=1)
            targets = pg.convert_padding(comp, cmask, padding_mode="right")
            return suffix[:, :-1], targets, suffix_mask[:, 1:]
    else:
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
    return run


def step_fn(provider: str, model, batch: dict):
    """One training step: logits, per-token log-probs, the policy-gradient loss, backward."""
    logits_of = logits_fn(provider, model, batch)
    advantages = batch["advantages"]

    def step():
        logits, targets, mask = logits_of()
        B, W, V = logits.shape
        logp = -F.cross_entropy(logits.reshape(B * W, V), targets.reshape(B * W), reduction="none").view(B, W)
        mask = mask.float()
        loss = -(logp.float() * advantages[:, None].float() * mask).sum() / mask.sum()
        loss.backward()
        model.zero_grad(set_to_none=True)

    step.logits_of = logits_of
    return step


# ---------------------------------------------------------------- outputs against stock


def valid_logits(logits_of) -> torch.Tensor:
    """The logits at the valid completion tokens, (tokens, V), row by row in order."""
    with torch.no_grad():
        logits, _, mask = logits_of()
        return logits[mask.bool()].detach()


def wider(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def match_fields(ours: torch.Tensor, stock: torch.Tensor, reference: torch.Tensor, stock_err: float,
                 dtype: torch.dtype) -> dict:
    if ours.shape != stock.shape:
        return dict(matches_stock=False, max_abs_logit_diff=None,
                    match_note=f"{tuple(ours.shape)} valid logits against stock's {tuple(stock.shape)}")
    diff = float((ours.float() - stock.float()).abs().max())
    err = float((ours.to(reference.dtype) - reference).abs().max())
    tol = 2 * stock_err + torch.finfo(dtype).eps * float(reference.abs().max())
    return dict(max_abs_logit_diff=diff, ref_err=err, stock_ref_err=stock_err, match_tol=tol,
                matches_stock=bool(err <= tol), reference_dtype=str(reference.dtype).replace("torch.", ""))


# ---------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def trim_heap() -> bool:
    """Return the memory freed so far to the system (glibc's malloc_trim, every arena), so that
    the next step's pages count in the RSS again instead of being reused unseen. False where
    there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def rss_delta_mib(fn) -> tuple[float | None, str | None]:
    """(peak RSS while fn() runs minus the RSS before it in MiB, None), or (None, why not).
    Linux: VmHWM reset through /proc/self/clear_refs; the heap trimmed first (trim_heap)."""
    if not trim_heap():
        return None, "no glibc malloc_trim: freed memory would be reused unseen"
    before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError as exc:
        return None, f"cannot reset the peak RSS: {exc}"
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None, "no VmRSS/VmHWM in /proc/self/status"
    return (peak - before) / 1024, None


@contextlib.contextmanager
def quiet():
    """transformers' and prefix_kernels' one-time notices off (the rows say what ran)."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("transformers", "prefix_kernels")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ---------------------------------------------------------------- timing


# alternated and quantiles: timing.py (shared with bench_train_step.py)


# ---------------------------------------------------------------- the run


def run(model_cfg, groups, Lp, completion_lens, prompts, providers, device, dtype, steps, warmup, results: Path,
        padded: bool = True, smoke: bool = False) -> list[dict]:
    import prefix_kernels

    env = environment(device, smoke)
    cuda = device.type == "cuda"
    progress = Progress(results, len(groups) * len(completion_lens) * len(providers), "shared_prompt")
    dtype_name = str(dtype).replace("torch.", "")
    models, unbuilt = {}, {}
    with quiet():
        for p in providers:  # once for every shape: the same weights (one seed) for each provider
            try:
                models[p] = build(p, model_cfg, device, dtype)
            except Exception as exc:  # reported in each of its rows, not dropped
                unbuilt[p] = f"{type(exc).__name__}: {str(exc)[:300]}"
        stock, reference = reference_models(models, model_cfg, device, dtype)
    for Lc in completion_lens:
        for G in groups:
            batch = make_batch(G, Lp, Lc, prompts, model_cfg["vocab_size"], padded, device)
            shape = dict(G=G, prompts=prompts, Lp=Lp, Lc=Lc, padded=padded, layers=model_cfg["num_hidden_layers"],
                         hidden=model_cfg["hidden_size"], Hq=model_cfg["num_attention_heads"],
                         Hkv=model_cfg["num_key_value_heads"], vocab=model_cfg["vocab_size"])
            completion_tokens = int(batch["completion_mask"].sum())
            base_row = dict(workload="shared_prompt", mode=MODE, shape=shape, dtype=dtype_name, B=prompts * G,
                            completion_tokens=completion_tokens, prompt_tokens=int(batch["prompt_mask"].sum()),
                            **env)
            rows = {p: dict(base_row, provider=p) for p in providers}
            for p, why in unbuilt.items():
                rows[p].update(status="skipped", reason=why)
            with quiet():
                steps_of = {p: step_fn(p, m, batch) for p, m in models.items()}
                check_outputs(rows, steps_of, batch, stock, reference, dtype)
                live = {p: steps_of[p] for p in providers if p in steps_of and rows[p].get("status") != "skipped"}
                times, peaks, failed = alternated(live, device, steps, warmup)
                for p, exc in failed.items():
                    rows[p].update(status="skipped", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
                for p in (q for q in live if q not in failed):
                    med, lo, hi = quantiles(times[p])
                    rows[p].update(status="ok", median_ms=med, p20_ms=lo, p80_ms=hi, steps=len(times[p]),
                                   warmup=warmup, tokens_per_s=completion_tokens / (med * 1e-3),
                                   tokens_counted=TOKENS_COUNTED)
                    if cuda:
                        rows[p].update(peak_mib=peaks[p], peak_what=GPU_PEAK)
                    else:  # one more step each, untimed, for the RSS
                        peak, why = rss_delta_mib(live[p])
                        rows[p].update(peak_mib=peak, peak_what=CPU_PEAK)
                        if why:
                            rows[p]["peak_error"] = why
            del live, steps_of, batch
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            for p in providers:
                rows[p].setdefault("peak_mib", None)
                progress.add(rows[p], _line(rows[p]))
    progress.close()
    prefix_kernels.revert_prefix_kernels()
    return progress.rows


def reference_models(models: dict, model_cfg: dict, device, dtype):
    """(stock model, stock model in the wider dtype with the same rounded weights) for the output
    check; (None, None) where they cannot be built."""
    import copy

    try:
        stock = models["stock_sdpa"] if "stock_sdpa" in models else build("stock_sdpa", model_cfg, device, dtype)
        return stock, copy.deepcopy(stock).to(wider(dtype))
    except Exception:
        return None, None


def check_outputs(rows: dict, steps_of: dict, batch: dict, stock, reference, dtype) -> None:
    """Each provider's logits on the valid completion tokens against stock's and against the
    stock forward in a wider dtype (same rounded weights); the fields go into the rows."""
    try:
        expected = valid_logits(logits_fn("stock_sdpa", stock, batch))
        truth = valid_logits(logits_fn("stock_sdpa", reference, batch))
        stock_err = float((expected.to(truth.dtype) - truth).abs().max())
    except Exception as exc:
        why = "no stock model" if stock is None else f"{type(exc).__name__}: {str(exc)[:200]}"
        for row in rows.values():
            row["match_note"] = f"outputs not checked: {why}"
        return
    for p, step in steps_of.items():
        try:
            ours = expected if p == "stock_sdpa" else valid_logits(step.logits_of)
            rows[p].update(match_fields(ours, expected, truth, stock_err, dtype))
            state = getattr(step.logits_of, "state", None)
            if state is not None:
                rows[p]["shared"] = state.get("shared")
        except Exception as exc:  # a provider that cannot even run its forward is skipped
            rows[p].update(status="skipped", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
    del expected, truth
    gc.collect()


def _line(row: dict) -> str:
    s = row["shape"]
    head = f"G={s['G']:3d} Lc={s['Lc']:4d} {row['provider']:15s} "
    if row.get("status") != "ok":
        return head + f"skipped: {row.get('reason')}"
    line = head + f"{row['median_ms']:9.1f} ms {row['tokens_per_s']:9.0f} tok/s "
    line += f"{row['peak_mib']:8.1f} MiB" if row.get("peak_mib") is not None else "peak memory not measured"
    if row.get("max_abs_logit_diff") is not None:
        line += f"  diff {row['max_abs_logit_diff']:.1e}"
    if row.get("matches_stock") is False:
        line += "  DOES NOT MATCH STOCK " + row.get("match_note", f"(error {row.get('ref_err', 0):.1e} > "
                                                             f"{row.get('match_tol', 0):.1e})")
    elif "matches_stock" not in row:
        line += f"  {row.get('match_note', 'outputs not checked')}"
    if row.get("shared") is False:
        line += "  (not shared: completion_logits ran the stock forward)"
    return line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model and shapes on the CPU")
    ap.add_argument("--cpu", action="store_true", help="a small model on the CPU (2 layers x 256 hidden), fp32")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON-lines file to upsert rows into")
    ap.add_argument("--providers", nargs="*", default=list(PROVIDERS), choices=list(PROVIDERS))
    ap.add_argument("--steps", type=positive_int, default=10,
                    help="timed steps per provider after warm-up (default 10)")
    ap.add_argument("--warmup", type=positive_int, default=None,
                    help="untimed steps per provider first (default 2 on a GPU: Triton compiles; 1 on a CPU)")
    ap.add_argument("--groups", type=positive_int, nargs="*", default=None,
                    help=f"completions per prompt G (default {' '.join(map(str, GROUPS))})")
    ap.add_argument("--completion-lens", type=positive_int, nargs="*", default=None,
                    help=f"completion lengths Lc (default {' '.join(map(str, COMPLETION_LENS))})")
    ap.add_argument("--prompt-len", type=positive_int, default=None, help=f"prompt length Lp (default {PROMPT_LEN})")
    ap.add_argument("--prompts", type=positive_int, default=PROMPTS,
                    help=f"distinct prompts per batch (default {PROMPTS})")
    ap.add_argument("--no-padding", action="store_true", help="every prompt Lp and every completion Lc tokens")
    args = ap.parse_args(argv)
    padded = not args.no_padding
    if args.smoke:
        return run(TINY, args.groups or (2, 4), args.prompt_len or 16, args.completion_lens or (8,), args.prompts,
                   args.providers, torch.device("cpu"), torch.float32, min(args.steps, 2), args.warmup or 1, args.out,
                   padded=padded, smoke=True)
    common = dict(groups=args.groups or GROUPS, Lp=args.prompt_len or PROMPT_LEN,
                  completion_lens=args.completion_lens or COMPLETION_LENS, prompts=args.prompts,
                  providers=args.providers, steps=args.steps, results=args.out, padded=padded)
    if args.cpu:
        return run(CPU_SMALL, device=torch.device("cpu"), dtype=torch.float32, warmup=args.warmup or 1, **common)
    if not torch.cuda.is_available():
        ap.error("no CUDA device: run with --cpu or --smoke on a CPU")
    return run(LLAMA_1B, device=torch.device("cuda"), dtype=torch.bfloat16, warmup=args.warmup or 2, **common)


if __name__ == "__main__":
    main()
