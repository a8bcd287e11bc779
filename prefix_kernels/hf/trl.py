"""TRL: GRPO, RLOO and DPO log-probabilities with each distinct prompt run once.

TRL (1.15 and later) computes every policy, old-policy and reference log-probability through one
forward that `trl.trainer.utils.add_fused_lm_head` binds to the model:
``model(input_ids, attention_mask, labels=labels, fused_lm_head=True)`` runs the backbone and
scores the tokens whose label is not -100 with a chunked output layer (temperature, entropy and
the other per-token fields included). `apply_prefix_kernels()` wraps that function, so that the
forward it binds to a model on "prefix_kernels" attention shares prompts:

1. Each row's prompt ends where its labels begin (GRPO and RLOO: one prompt width for the whole
   call, left-padded; DPO: chosen and rejected rows, right-padded, one boundary per row). Rows
   whose prompt tokens (and padding) are equal are found once each (`distinct_prompts`).
2. The distinct prompts but their last token run once through the backbone; their keys and
   values become a `PrefixCache` (padding as `prefix_mask`).
3. Each row's last prompt token and its completion run against that cache through TRL's own
   forward, so TRL's output layer, temperature and per-token fields are unchanged; the results
   are put back where the stock call has them, 0 elsewhere.

Positions: the stock ones. Where every row's prompt has one width (GRPO, RLOO) the model derives
them as in the stock call; where widths differ (DPO, no left padding) each token gets its column
in the stock row. Calls that cannot be shared this way run TRL's forward unchanged: no repeated
prompt, `output_router_logits` (MoE load-balancing loss over every token), a model not on
prefix_kernels attention, multimodal or embedding inputs, dropout acting in training.

Which rows share a micro-batch is TRL's choice: see docs/trl.md for the settings that keep a
prompt's completions together (GRPO, RLOO: steps_per_generation=1 and a per-device batch that is
a multiple of num_generations). The first shared call logs how many prompt tokens it saved.
"""

from __future__ import annotations

import functools
import importlib.abc
import logging
import sys
from typing import Optional

import torch
from transformers.cache_utils import DynamicCache

from .._core.log import log_once
from . import compat, delivery
from .cache import PrefixCache
from .completion import _why_not_shared, distinct_prompts, first_rows
from .models import transformers_model, uses_prefix_kernels
from .prompt import _returned_cache, checkpointing_off

_TARGET = "trl.trainer.utils"
_original_add = None  # TRL's add_fused_lm_head while ours is in place
_enabled = False
stats = {"calls": 0, "shared_calls": 0, "rows": 0, "prompts": 0, "prompt_tokens_saved": 0}


# ------------------------------------------------------------------ installing the wrapper


def _wrapped_add(original):
    @functools.wraps(original)
    def add_fused_lm_head(model, *args, **kwargs):
        result = original(model, *args, **kwargs)
        fused = vars(model).get("forward")
        if fused is not None and not getattr(fused, "_prefix_kernels_shared", False):
            model.forward = _shared_forward(model, fused)
        return result

    add_fused_lm_head._prefix_kernels_original = original
    return add_fused_lm_head


def _patch_module(module) -> None:
    """Replace TRL's add_fused_lm_head in trl.trainer.utils and in every trl module that imported it."""
    global _original_add
    current = getattr(module, "add_fused_lm_head", None)
    if current is None or getattr(current, "_prefix_kernels_original", None) is not None:
        return
    _original_add = current
    wrapped = _wrapped_add(current)
    for name, mod in list(sys.modules.items()):
        if (name == "trl" or name.startswith("trl.")) and getattr(mod, "add_fused_lm_head", None) is current:
            mod.add_fused_lm_head = wrapped


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches trl.trainer.utils right after it is imported (importing TRL just to patch it would
    cost seconds to every user of apply_prefix_kernels, TRL user or not)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                loader = spec.loader
                original_exec = loader.exec_module

                def exec_module(module, _exec=original_exec):
                    _exec(module)
                    if _enabled:
                        _patch_module(module)

                spec.loader = _Loader(loader, exec_module)
                return spec
            if spec is not None:
                return spec
        return None


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, exec_module):
        self._inner, self._exec = inner, exec_module

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._exec(module)


_finder = _PatchOnImport()


def patch_trl() -> None:
    """Share prompts in TRL's log-probability forward (now if TRL is imported, else on its import)."""
    global _enabled
    _enabled = True
    if _TARGET in sys.modules:
        _patch_module(sys.modules[_TARGET])
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def unpatch_trl() -> None:
    """Undo patch_trl: TRL's add_fused_lm_head restored; forwards bound meanwhile run TRL's code."""
    global _enabled, _original_add
    _enabled = False
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    if _original_add is not None:
        for name, mod in list(sys.modules.items()):
            current = getattr(mod, "add_fused_lm_head", None) if (name == "trl" or name.startswith("trl.")) else None
            if current is not None and getattr(current, "_prefix_kernels_original", None) is _original_add:
                mod.add_fused_lm_head = _original_add
        _original_add = None


# ------------------------------------------------------------------ the shared forward


def _shared_forward(model, fused):
    """A forward for `model` that shares prompts in TRL's fused log-probability calls and hands
    every other call to `fused` (TRL's bound forward) unchanged."""

    @functools.wraps(fused)
    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        call = dict(fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                    num_items_in_batch=num_items_in_batch)
        plan = _plan(model, args, labels, shift_labels, kwargs) if (_enabled and fused_lm_head) else None
        if plan is None:
            return fused(*args, **call, **kwargs)
        return _run_shared(model, fused, plan, labels, num_items_in_batch, kwargs)

    forward._prefix_kernels_shared = True
    return forward


_OTHER_INPUTS = ("inputs_embeds", "past_key_values", "cache", "position_ids", "pixel_values", "token_type_ids",
                 "output_router_logits", "image_grid_thw", "mm_token_type_ids")


def _plan(model, args, labels, shift_labels, kwargs) -> Optional[dict]:
    """Where each row's prompt ends and which rows share it, or None to run TRL's forward."""
    stats["calls"] += 1
    if args or shift_labels is not None or labels is None or any(kwargs.get(k) is not None for k in _OTHER_INPUTS):
        return None
    ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not isinstance(mask, torch.Tensor):
        return None
    if torch.compiler.is_compiling() or not uses_prefix_kernels(model):
        return None
    N, L = ids.shape
    valid = labels != -100
    has = valid.any(1)
    if not bool(has.any()):
        return None
    first = torch.where(has, valid.float().argmax(1), L)  # the first scored column of each row
    start = int(first[has].min())
    first = torch.where(has, first, start)  # a row with nothing scored: any boundary will do
    if start < 2:
        return None  # a prompt of one token leaves nothing to share
    same_width = bool((first == first[0]).all())
    prompt_len = first - 1  # the shared part: the prompt but its last token, which runs with the completion
    P = int(prompt_len.max())
    # each row's shared part left-padded to width P: its source columns, < 0 on that padding (also
    # the stock positions of its tokens, where widths differ)
    cols = torch.arange(P, device=ids.device)[None] - (P - prompt_len)[:, None]
    inside = cols >= 0
    src = cols.clamp(min=0)
    pids = torch.where(inside, ids.gather(1, src), torch.zeros_like(ids[:, :1]))
    real = mask.gather(1, src).bool()
    if not same_width and not bool(real[inside].all()):
        return None  # prompts of several widths with their own padding: positions would not be the stock ones
    pmask = inside & real
    unique, umask, index = distinct_prompts(pids, pmask)
    G = unique.shape[0]
    if G == N:
        log_once("prefix_kernels: TRL log-probabilities: no prompt repeats within a micro-batch, nothing to share; "
                 "keep a prompt's completions together (GRPO/RLOO: steps_per_generation=1 and "
                 "per_device_train_batch_size a multiple of num_generations)", logging.INFO)
        return None
    base = transformers_model(model)
    why = _why_not_shared(model, base, P + 1, L - start)
    if why is not None:
        log_once(f"prefix_kernels: TRL log-probabilities run without sharing prompts: {why}")
        return None
    return dict(first=first, same_width=same_width, unique=unique, umask=umask, index=index, G=G, src=src,
                saved=int(pmask.sum()) - int(umask.sum()))


def _tail(x, cols, inside, fill):
    """x at the columns `cols` of each row, `fill` where `inside` is False (past the row's end)."""
    return torch.where(inside, x.gather(1, cols.clamp(max=x.shape[1] - 1)), torch.full_like(x[:, :1], fill))


def _run_shared(model, fused, plan, labels, num_items_in_batch, kwargs):
    ids, mask = kwargs.pop("input_ids"), kwargs.pop("attention_mask")
    N, L = ids.shape
    first = plan["first"]
    base = transformers_model(model)
    delivery.install(base)
    cache_kwarg = compat.cache_kwarg(base)
    position = {}
    if not plan["same_width"]:  # each token at its column of the stock row
        position = {"position_ids": plan["src"][first_rows(plan["index"], plan["G"])]}
    with checkpointing_off(base):
        out = base.get_decoder()(input_ids=plan["unique"], attention_mask=plan["umask"].long(), use_cache=True,
                                 return_dict=True, **position, **{cache_kwarg: DynamicCache()})
    prefix = PrefixCache.from_cache(_returned_cache(out), prefix_index=plan["index"], prefix_mask=plan["umask"])
    del out

    # each row's last prompt token and completion: columns first - 1 onwards, left-aligned
    width = L - int(first.min()) + 1
    cols = (first - 1)[:, None] + torch.arange(width, device=ids.device)[None]
    inside = cols < L
    tail_ids = _tail(ids, cols, inside, 0)
    tail_labels = _tail(labels, cols, inside, -100)
    tail_labels[:, 0] = -100
    tail_mask = _tail(mask, cols, inside, 0)
    tail_kwargs = dict(kwargs)
    if not plan["same_width"]:
        tail_kwargs["position_ids"] = cols.clamp(max=L - 1)
    result = fused(input_ids=tail_ids, attention_mask=torch.cat([plan["umask"][plan["index"]].long(),
                                                                 tail_mask.long()], 1),
                   labels=tail_labels, fused_lm_head=True, num_items_in_batch=num_items_in_batch,
                   **{cache_kwarg: prefix}, **tail_kwargs)
    _count(N, plan)
    return _scatter_back(result, cols, inside, labels, num_items_in_batch, L)


def _scatter_back(result, cols, inside, labels, num_items_in_batch, L):
    """The tail call's per-token fields (N, width - 1), put at the stock call's columns (N, L - 1)."""
    N = cols.shape[0]
    target = cols[:, :-1]  # log-prob t of the tail predicts its token t + 1, stock column cols[t] + 1 - 1
    ok = inside[:, 1:]
    fields = {}
    spill = torch.where(ok, target, L - 1)  # entries past a row's end go to a column that is cut off
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"):
        value = getattr(result, name, None)
        if value is None:
            continue
        fields[name] = value.new_zeros(N, L).scatter(1, spill, value)[:, :L - 1]
    mask = labels[:, 1:] != -100
    log_probs = fields["log_probs"]
    denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    updates = dict(fields, loss=-log_probs.sum() / denominator)
    if hasattr(result, "label_mask") and getattr(result, "label_mask", None) is not None:
        updates["label_mask"] = mask
    for key, value in updates.items():
        result[key] = value
    return result


def _count(rows: int, plan) -> None:
    stats["shared_calls"] += 1
    stats["rows"] += rows
    stats["prompts"] += plan["G"]
    stats["prompt_tokens_saved"] += plan["saved"]
    log_once(f"prefix_kernels: TRL log-probabilities share prompts: {rows} rows, {plan['G']} distinct prompts, "
             f"{plan['saved']} prompt tokens not recomputed in this call (prefix_kernels.hf.trl.stats counts all "
             "calls)", logging.INFO)
