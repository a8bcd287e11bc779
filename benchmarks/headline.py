"""The README's headline table, from the stored rows: for each workload (and mode, device, dtype),
the package's speedup over the best baseline that ran at the same shape, and the fraction of the
hardware limit its kernel reached (decode: of the copy bandwidth measured on that card;
attention: of the bf16 matmul rate measured there; end to end: none).

At each shape the package's fastest provider (for decode, the faster of triton and cuda: what
`auto` picks once `decode_choice.json` is written) is set against the fastest baseline with
status ok; a provider that was skipped is no baseline, and is listed under the table with its
reason, as is one whose outputs did not match stock's (matches_stock false, shared_prompt).
Smoke rows are left out, and rows of different commits are never paired. The table gives the
range over shapes.

    python benchmarks/headline.py [--results benchmarks/results]     # prints markdown
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot import RESULTS, is_subject, load_rows  # noqa: E402

# Rows that compare no provider with a baseline: tune_triton's tile timings (rows of one kernel).
NOT_COMPARED = ("tune",)
# The row field that says how close to the hardware a provider came, per workload.
# Timed beside the defaults to decide a default, not what a user gets without asking: left out
# of the headline (the rows and plots keep them).
OPT_IN = {"prefix_kernels_triton_fused", "prefix_kernels_triton_unfused_merge", "prefix_kernels_triton_separate_parts",
          "prefix_kernels_cuda_fused", "prefix_kernels_cuda_separate_parts"}
LIMIT_FIELD = {"decode": ("frac_copy_bw", "copy bandwidth"), "attention": ("frac_matmul", "matmul rate")}


def _shape_key(shape: dict) -> str:
    return json.dumps(shape, sort_keys=True)


def headline(rows: list[dict]) -> list[dict]:
    """One entry per (workload, mode, device, dtype, commit): shapes compared, speedup range, the
    baselines that were fastest, the range of the package's fraction of the hardware limit, and
    the providers skipped at some shape with their first reason. Rows of different commits are
    never paired (a rerun of ours alone would otherwise be set against an older baseline)."""
    cases = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["workload"] in NOT_COMPARED:
            continue
        group = (r["workload"], r.get("mode"), r.get("device"), r.get("dtype"), r.get("commit"))
        cases[group][_shape_key(r["shape"])][r["provider"]] = r
    table = []
    for (workload, mode, device, dtype, commit), shapes in sorted(cases.items(), key=lambda kv: repr(kv[0])):
        speedups, baselines, fractions, skipped = [], set(), [], {}
        for by_provider in shapes.values():
            by_provider = {p: r for p, r in by_provider.items() if p not in OPT_IN}
            for p, r in by_provider.items():
                if r.get("status") == "skipped":
                    skipped.setdefault(p, (r.get("reason") or "").partition("\n")[0][:120])
                elif r.get("matches_stock") is False:  # ran, but a wrong result's speed is no speedup
                    diff = r.get("max_abs_logit_diff")
                    skipped.setdefault(p, "outputs did not match stock's" + (
                        f" (max abs logit difference {diff:.3g})" if diff is not None else ""))
            ok = {p: r for p, r in by_provider.items()
                  if r.get("status") == "ok" and r.get("matches_stock") is not False}
            ours = [r for p, r in ok.items() if is_subject(p)]
            theirs = [r for p, r in ok.items() if not is_subject(p)]
            if not ours or not theirs:
                continue
            best = min(ours, key=lambda r: r["median_ms"])
            base = min(theirs, key=lambda r: r["median_ms"])
            speedups.append(base["median_ms"] / best["median_ms"])
            baselines.add(base["provider"])
            field = LIMIT_FIELD.get(workload, (None,))[0]
            if field and best.get(field) is not None:
                fractions.append(best[field])
        if speedups:
            table.append(dict(workload=workload, mode=mode, device=device, dtype=dtype, shapes=len(speedups),
                              speedup_min=min(speedups), speedup_max=max(speedups), best_baselines=sorted(baselines),
                              limit=LIMIT_FIELD.get(workload, (None, None))[1],
                              fraction_min=min(fractions) if fractions else None,
                              fraction_max=max(fractions) if fractions else None,
                              commits=[commit] if commit else [], skipped=dict(sorted(skipped.items()))))
        else:  # said, not dropped: e.g. ours rerun alone at a new commit
            table.append(dict(workload=workload, mode=mode, device=device, dtype=dtype, shapes=0,
                              commits=[commit] if commit else [], skipped=dict(sorted(skipped.items()))))
    return table


def _range(lo, hi, fmt) -> str:
    return fmt.format(lo) if abs(hi - lo) < 0.005 else f"{fmt.format(lo)} – {fmt.format(hi)}"


def markdown(table: list[dict]) -> str:
    lines = ["| workload | device | dtype | shapes | speedup over the best baseline | best baseline | "
             "fraction of the hardware limit | commit |",
             "| --- | --- | --- | ---: | ---: | --- | ---: | --- |"]
    notes = []
    for e in table:
        name = f"{e['workload']} ({e['mode']})"
        notes += [f"- {name}, {e['device']}: {p} skipped ({why or 'no reason recorded'})"
                  for p, why in e["skipped"].items()]
        if not e["shapes"]:
            notes.append(f"- {name}, {e['device']}: no shape where the package and a baseline both ran")
            continue
        fraction = ("-" if e["fraction_min"] is None else
                    _range(100 * e["fraction_min"], 100 * e["fraction_max"], "{:.0f}%") + f" of {e['limit']}")
        lines.append(f"| {name} | {e['device']} | {e['dtype']} | {e['shapes']} | "
                     f"{_range(e['speedup_min'], e['speedup_max'], '{:.2f}x')} | {', '.join(e['best_baselines'])} | "
                     f"{fraction} | {', '.join(e['commits']) or '-'} |")
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of *.jsonl rows (searched recursively)")
    args = ap.parse_args(argv)
    text = markdown(headline(load_rows(args.results, skipped=True)))
    print(text)
    return text


if __name__ == "__main__":
    main()
