"""`prefix-kernels demo`: prefix-tune a Llama-shaped model on table-to-text, stock and patched.

Both runs start from the same random weights and the same prefix initialisation and see the same
batches; each runs in its own child process so that its loss curve and peak memory are its own.
Step time is then measured with the two models' steps alternated in one process (see
`interleaved_seconds`), so that a shared machine's drift cannot favour either. Stock is PEFT
prefix tuning on SDPA attention (the prefix copied per request in every layer); patched is the
same after `prefix_kernels.apply_prefix_kernels()` (the prefix read once, its gradient reduced
in the kernel). The two loss curves must agree; the table shows step time and peak memory.

On a CPU: a small model (one to two minutes on 2 cores). On a GPU: a ~1B-parameter Llama shape in bf16.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue as queue_module
import re
import statistics
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from ..data import load_e2e

PAD, BOS, EOS, SEP = 0, 1, 2, 3


@dataclass(frozen=True)
class DemoConfig:
    device: str
    dtype: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    batch_size: int
    prefix: int
    steps: int
    lr: float = 5e-3
    seed: int = 0

    @classmethod
    def for_device(cls, device: str, steps: int | None = None) -> "DemoConfig":
        """The demo's model for this device; `steps` None means the device's default."""
        if steps is not None and steps < 1:
            raise ValueError(f"steps={steps}: the demo needs at least one training step")
        if device.startswith("cuda"):
            # Llama-3.2-1B's shape: ~1.2B parameters
            return cls(device, "bfloat16", 2048, 16, 32, 8, 8192, 16, 64, 40 if steps is None else steps)
        return cls(device, "float32", 256, 4, 8, 2, 512, 16, 16, 30 if steps is None else steps)


class WordTokenizer:
    """Words and punctuation of the shipped data; no download needed."""

    SPLIT = re.compile(r"\w+|[^\w\s]")

    def __init__(self, rows):
        words = sorted({w for r in rows for w in self.SPLIT.findall(r["table"] + " " + r["text"])})
        self.vocab = {w: i + 4 for i, w in enumerate(words)}

    def __len__(self):
        return len(self.vocab) + 4

    def encode(self, text: str) -> list:
        return [self.vocab[w] for w in self.SPLIT.findall(text)]


def make_batches(cfg: DemoConfig, rows, tok: WordTokenizer) -> list:
    """`steps` right-padded batches: [BOS] table [SEP] text [EOS], loss on the text only."""
    g = torch.Generator().manual_seed(cfg.seed)
    batches = []
    for _ in range(cfg.steps):
        picks = torch.randint(0, len(rows), (cfg.batch_size,), generator=g).tolist()
        seqs = []
        for i in picks:
            src = [BOS] + tok.encode(rows[i]["table"]) + [SEP]
            tgt = tok.encode(rows[i]["text"]) + [EOS]
            seqs.append((src + tgt, [-100] * len(src) + tgt))
        L = max(len(s) for s, _ in seqs)
        ids = torch.full((cfg.batch_size, L), PAD)
        labels = torch.full((cfg.batch_size, L), -100)
        mask = torch.zeros((cfg.batch_size, L), dtype=torch.long)
        for b, (s, lab) in enumerate(seqs):
            ids[b, : len(s)], labels[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), torch.tensor(lab), 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


class _StockOnPurpose(logging.Filter):
    """The demo's stock model runs stock PEFT on SDPA on purpose: the package's warning that the
    patch does nothing for such a model is no news here."""

    def filter(self, record):
        return "has no effect on this model" not in record.getMessage()


@contextmanager
def quiet():
    """A clean report: no deprecation warnings or progress bars from transformers' internals (the
    demo's own progress bars stay, and vanish when done). Everything is restored on exit."""
    logger = logging.getLogger("prefix_kernels")
    stock_on_purpose = _StockOnPurpose()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        hf_logging = None
        try:
            from transformers.utils import logging as hf_logging

            verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        logger.addFilter(stock_on_purpose)
        try:
            yield
        finally:
            logger.removeFilter(stock_on_purpose)
            if hf_logging is not None:
                hf_logging.set_verbosity(verbosity)
                if bars:
                    hf_logging.enable_progress_bar()


def _progress(items, desc: str, show: bool):
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def llama(cfg: DemoConfig, patched: bool, vocab: int, max_positions: int = 512):
    """The demos' model: the Llama shape of `cfg` with random weights from cfg.seed, on SDPA
    (stock) or on "prefix_kernels" attention after apply_prefix_kernels() (patched)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import prefix_kernels

    if patched:
        prefix_kernels.apply_prefix_kernels()
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=max_positions)
    config._attn_implementation = "prefix_kernels" if patched else "sdpa"
    return LlamaForCausalLM(config).to(device=cfg.device, dtype=getattr(torch, cfg.dtype))


def _build(cfg: DemoConfig, patched: bool, vocab: int):
    from peft import PrefixTuningConfig, get_peft_model

    model = llama(cfg, patched, vocab)
    torch.manual_seed(cfg.seed + 1)
    # Li & Liang's reparameterisation: an MLP maps P embeddings to every layer's K/V
    peft_cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.prefix, prefix_projection=True,
                                  encoder_hidden_size=cfg.hidden)
    return get_peft_model(model, peft_cfg).to(device=cfg.device, dtype=getattr(torch, cfg.dtype))


def _peak_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (whole process)


def train(cfg: DemoConfig, patched: bool, queue=None, progress: bool = True) -> dict:
    """One run; returns losses, per-step seconds, tokens per step and peak memory."""
    with quiet():
        result = _train(cfg, patched, progress)
    if queue is not None:
        queue.put(result)
    return result


def _train(cfg: DemoConfig, patched: bool, progress: bool) -> dict:
    rows = load_e2e()
    tok = WordTokenizer(rows)
    model = _build(cfg, patched, len(tok))
    return run_steps(cfg, model, make_batches(cfg, rows, tok), lambda m, batch: m(**batch).loss,
                     lambda batch: int(batch["attention_mask"].sum()), "patched" if patched else "stock  ", progress)


def _timed(cfg: DemoConfig, model, opt, loss_of, batch) -> tuple:
    """One training step: (loss, seconds), the device synchronised around it."""
    cuda = cfg.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = loss_of(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return loss, time.perf_counter() - t0


def _optimizer(cfg: DemoConfig, model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)


def run_steps(cfg: DemoConfig, model, batches, loss_of, tokens_of, desc: str, progress: bool) -> dict:
    """Train `model` on `batches` with loss_of(model, batch); losses, per-step seconds, tokens per
    step (tokens_of(batch)), peak memory and the parameter count."""
    model.train()
    opt = _optimizer(cfg, model)
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    losses, seconds, tokens = [], [], []
    for batch in _progress(batches, desc, progress):
        batch = {k: v.to(cfg.device) for k, v in batch.items()}
        loss, dt = _timed(cfg, model, opt, loss_of, batch)
        seconds.append(dt)
        losses.append(float(loss.detach()))
        tokens.append(tokens_of(batch))
    return {"losses": losses, "seconds": seconds, "tokens": tokens, "peak_mib": _peak_mib(cfg.device),
            "params": sum(p.numel() for p in model.parameters())}


def alternate(cfg: DemoConfig, models: dict, batches, loss_of, rounds: int, progress: bool) -> dict:
    """Step times of the "stock" and "patched" models, their steps alternated on the same batches
    (the order switched every round): loss_of(model, batch, patched)."""
    opts = {n: _optimizer(cfg, m) for n, m in models.items()}
    seconds = {"stock": [], "patched": []}
    for i in _progress(range(rounds), "timing both, alternated", progress):
        batch = {k: v.to(cfg.device) for k, v in batches[i % len(batches)].items()}
        for name in (("stock", "patched") if i % 2 == 0 else ("patched", "stock")):
            models[name].train()
            step_loss = (lambda m, b, patched=name == "patched": loss_of(m, b, patched))
            seconds[name].append(_timed(cfg, models[name], opts[name], step_loss, batch)[1])
    return seconds


class ChildRunError(RuntimeError):
    """A run's child process died without a result (its traceback, if any, is on stderr)."""


POLL_S = 1.0  # how often the parent looks whether the child is still alive while it waits


def _in_child(cfg: DemoConfig, patched: bool, target=None) -> dict:
    """`target` (default: train) in a spawned child; its result, or ChildRunError if the child dies.

    The queue is polled with a timeout rather than read with a blocking get: a child that dies
    (a crash, a kill, out of memory) never puts anything, and a blocking get would wait forever."""
    name = "patched" if patched else "stock"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target or train, args=(cfg, patched, queue))
    proc.start()
    try:
        result = _wait_for_result(queue, proc)
    finally:
        proc.join(timeout=None if proc.exitcode is not None else 60)
        if proc.is_alive():  # it sent its result but does not exit: do not leave it behind
            proc.kill()
            proc.join()
    if result is None:
        raise ChildRunError(f"the {name} run failed in its child process ({_exit_reason(proc.exitcode)}); "
                            "its error, if it printed one, is above")
    if proc.exitcode:
        raise ChildRunError(f"the {name} run failed after sending its result ({_exit_reason(proc.exitcode)})")
    return result


def _wait_for_result(queue, proc):
    """The child's result, or None once the child has exited without sending one."""
    while True:
        try:
            return queue.get(timeout=POLL_S)
        except queue_module.Empty:
            if proc.is_alive():
                continue
        try:  # it exited: anything it sent just before is in the pipe by now
            return queue.get(timeout=POLL_S)
        except queue_module.Empty:
            return None


def _exit_reason(code) -> str:
    return f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"


def interleaved_seconds(cfg: DemoConfig, rounds: int | None = None, progress: bool = True) -> dict:
    """Step times of both models measured in alternation, in this process, on the same batches.

    Timing the two runs one after the other lets any drift of a shared machine (on the 2-core CPU
    this was written on: +-10% from run to run) land on one side; alternating steps, with the
    order switched every round, puts both under the same conditions. The stock model keeps SDPA:
    every patch acts only on models whose attention is "prefix_kernels"."""
    with quiet():
        return _interleaved_seconds(cfg, rounds, progress)


def _interleaved_seconds(cfg: DemoConfig, rounds, progress: bool) -> dict:
    rows = load_e2e()
    tok = WordTokenizer(rows)
    batches = make_batches(cfg, rows, tok)
    models = {name: _build(cfg, name == "patched", len(tok)) for name in ("stock", "patched")}
    return alternate(cfg, models, batches, lambda m, batch, patched: m(**batch).loss, rounds or len(batches), progress)


def summarise(cfg: DemoConfig, stock: dict, ours: dict, warmup: int = 3, timing: dict | None = None) -> dict:
    rel = [abs(a - b) / abs(a) for a, b in zip(stock["losses"], ours["losses"])]
    if timing is not None:  # interleaved measurement replaces the per-run step times
        stock, ours = dict(stock, seconds=timing["stock"]), dict(ours, seconds=timing["patched"])

    def median_ms(r):
        return 1e3 * statistics.median(r["seconds"][warmup:] or r["seconds"])

    return {
        "max_rel_loss_diff": max(rel),
        "stock_ms": median_ms(stock),
        "patched_ms": median_ms(ours),
        "speedup": median_ms(stock) / median_ms(ours),
        "stock_tok_s": statistics.mean(stock["tokens"]) / median_ms(stock) * 1e3,
        "patched_tok_s": statistics.mean(ours["tokens"]) / median_ms(ours) * 1e3,
        "stock_peak_mib": stock["peak_mib"],
        "patched_peak_mib": ours["peak_mib"],
    }


def format_report(cfg: DemoConfig, stock: dict, ours: dict, summary: dict) -> str:
    mem = "peak GPU memory allocated" if cfg.device.startswith("cuda") else "peak RSS of the process"
    lines = [
        f"prefix-tuning, Llama shape {cfg.layers} layers x {cfg.hidden} hidden, {cfg.heads} heads / {cfg.kv_heads} kv "
        f"heads, {stock['params'] / 1e6:.1f}M parameters, {cfg.dtype}, batch {cfg.batch_size}, prefix {cfg.prefix}, "
        f"on {cfg.device}",
        "",
        f"{'step':>4}  {'stock loss':>11}  {'patched loss':>12}  {'rel diff':>9}",
    ]
    n = len(stock["losses"])
    shown = sorted(set(range(0, n, max(1, n // 10))) | {n - 1})
    for i in shown:
        a, b = stock["losses"][i], ours["losses"][i]
        lines.append(f"{i + 1:>4}  {a:>11.5f}  {b:>12.5f}  {abs(a - b) / abs(a):>9.1e}")
    lines += [
        "",
        f"{'':24}{'stock (PEFT + SDPA)':>22}{'patched':>12}",
        f"{'median step (ms)':24}{summary['stock_ms']:>22.1f}{summary['patched_ms']:>12.1f}"
        "   (steps of the two models alternated, same batches)",
        f"{'tokens / s':24}{summary['stock_tok_s']:>22.0f}{summary['patched_tok_s']:>12.0f}",
        f"{mem[:24]:24}{summary['stock_peak_mib']:>18.0f} MiB{summary['patched_peak_mib']:>8.0f} MiB",
        "",
        f"loss curves agree: max relative difference {summary['max_rel_loss_diff']:.1e} over {n} steps; "
        f"patched step {summary['speedup']:.2f}x the speed of stock",
    ]
    return "\n".join(lines)


def run_demo(device: str | None = None, steps: int | None = None) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA device here")  # the children would die on it
    cfg = DemoConfig.for_device(device, steps)
    stock = _in_child(cfg, patched=False)
    ours = _in_child(cfg, patched=True)
    timing = interleaved_seconds(cfg)
    summary = summarise(cfg, stock, ours, timing=timing)
    print(format_report(cfg, stock, ours, summary))
    return {"config": asdict(cfg), "summary": summary, "stock": stock, "patched": ours}
