"""Plots drawn from the benchmark rows (the JSON-lines files under benchmarks/results/), never typed in.

  <workload>_speedup_*.png   speedup (baseline median ms / prefix_kernels median ms) of each
                             prefix_kernels provider against each baseline provider, across P
                             (attention: one panel per mode, fwd and fwd_bwd; decode: one panel per
                             batch size B; train_step: across P; generate: across the samples N;
                             shared_prompt: across the completions per prompt G, one panel per
                             completion length Lc)
  <workload>_memory_*.png    peak GPU memory against batch size, per provider, for rows that
                             recorded it (train_step, generate on a GPU; CPU rows have none);
                             shared_prompt: against G, the peak above the weights (on a CPU the
                             RSS delta of a step)

Rows are grouped by (workload, device, commit, dtype): one figure per group, titled with the device
and commit its rows came from. Rows with status "skipped" and smoke rows are ignored; a group with
nothing to draw draws nothing.

    python benchmarks/plot.py                                   # benchmarks/results -> benchmarks/results/plots
    python benchmarks/plot.py --results DIR --out DIR

Needs matplotlib: pip install ".[bench]"
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import read_rows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NOTHING_TO_DRAW = ("no package provider and baseline measured (status ok, not smoke) at the same shape, "
                   "device, commit and dtype")
MISSING = 'plotting needs matplotlib, which is not installed: pip install ".[bench]" (or pip install matplotlib)'

# Per workload, the speedup figures: (x axis, fields that split it into panels). Decode is drawn
# across P (one panel per B) and across B (one panel per P).
SPEEDUP_AXES = {
    "attention": (("P", ()),),
    "decode": (("P", ("B",)), ("B", ("P",))),
    "train_step": (("P", ()),),
    "generate": (("B", ()),),
    "shared_prompt": (("G", ("Lc",)),),
}
MEMORY_WORKLOADS = ("decode", "train_step", "generate", "shared_prompt")
MEMORY_X = {"shared_prompt": "G"}  # the memory figure's x axis where it is not the batch size B
X_LABELS = {("generate", "B"): "B (N sequences)", ("shared_prompt", "G"): "G (completions per prompt)"}
MEMORY_X_LABELS = {"generate": "batch size B (samples N)", "shared_prompt": "G (completions per prompt)"}


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or an ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(MISSING) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_rows(results: Path, skipped: bool = False) -> list[dict]:
    """The measured rows of the *.jsonl files under results (recursively): status "ok", or with
    skipped=True also those with status "skipped" (their reasons). Smoke rows (tiny shapes, run
    to keep the scripts alive) are never numbers to show and are left out."""
    rows = []
    for path in sorted(Path(results).rglob("*.jsonl")):
        for row in read_rows(path):
            if row.get("smoke"):
                continue
            if (row.get("status") == "ok" and row.get("median_ms") is not None) or (
                    skipped and row.get("status") == "skipped"):
                rows.append(row)
    return rows


def is_subject(provider: str) -> bool:
    """The package's own providers (prefix_kernels, prefix_kernels_triton / _cuda / _generate)."""
    return provider.startswith("prefix_kernels")


def _groups(rows):
    groups = defaultdict(list)
    for row in rows:
        groups[(row["workload"], row.get("device"), row.get("commit"), row.get("dtype"))].append(row)
    return groups


def _rest(shape: dict, drop) -> tuple:
    return tuple(sorted((k, v) for k, v in shape.items() if k not in drop))


def _describe(rest: tuple, varying: set) -> str:
    return ", ".join(f"{k}={v}" for k, v in rest if k in varying)


def speedup_series(rows: list[dict], x_field: str, panel_fields=()) -> dict:
    """{panel title: {line label: [(x, speedup), ...]}} for rows of one group. A line pairs a
    prefix_kernels provider with a baseline at the same mode and the same shape except x. Rows
    flagged as not matching stock's outputs (matches_stock false) are left out."""
    drop = {x_field, *panel_fields}
    by_key = {}
    for row in rows:
        shape = row["shape"]
        if x_field not in shape or row.get("matches_stock") is False:  # a wrong result's speed is no speedup
            continue
        panel = (row.get("mode"),) + tuple(shape.get(f) for f in panel_fields)
        by_key[(panel, _rest(shape, drop), shape[x_field], row["provider"])] = row["median_ms"]
    rests = {rest for _, rest, _, _ in by_key}
    varying = {k for k in {k for r in rests for k, _ in r} if len({dict(r).get(k) for r in rests}) > 1}
    series = defaultdict(lambda: defaultdict(list))
    for (panel, rest, x, provider), ms in sorted(by_key.items(), key=lambda kv: repr(kv[0])):
        if not is_subject(provider):
            continue
        for (panel2, rest2, x2, base), base_ms in by_key.items():
            if (panel2, rest2, x2) == (panel, rest, x) and not is_subject(base):
                label = f"{provider} vs {base}" + (f" ({_describe(rest, varying)})" if _describe(rest, varying) else "")
                series[panel][label].append((x, base_ms / ms))

    def title(panel):
        return ", ".join([f"mode={panel[0]}"] + [f"{f}={v}" for f, v in zip(panel_fields, panel[1:])])

    def order(panel):  # numbers in numeric order (B=8 before B=64), then the rest by name
        return [(0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in panel]

    return {title(p): {lbl: sorted(pts) for lbl, pts in sorted(series[p].items())} for p in sorted(series, key=order)}


def memory_series(rows: list[dict], x_field: str = "B") -> dict:
    """{line label: [(x, peak MiB), ...]} for rows of one group that recorded peak memory, x the
    shape's x_field (the batch size B; shared_prompt: G)."""
    picked = [r for r in rows if r.get("peak_mib") is not None and x_field in r["shape"]]
    rests = {_rest(r["shape"], {x_field}) for r in picked}
    varying = {k for k in {k for r in rests for k, _ in r} if len({dict(r).get(k) for r in rests}) > 1}
    lines = defaultdict(list)
    for r in picked:
        rest = _describe(_rest(r["shape"], {x_field}), varying)
        label = f"{r['provider']}" + (f" [{r.get('mode')}]" if r.get("mode") else "") + (f" ({rest})" if rest else "")
        lines[label].append((r["shape"][x_field], r["peak_mib"]))
    return {label: sorted(pts) for label, pts in sorted(lines.items())}


def _slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", "_".join(str(p) for p in parts if p is not None)).strip("-")


def _title(what: str, workload: str, device, commit, dtype) -> str:
    return f"{workload}: {what}\n{device or 'unknown device'}, commit {commit or 'unknown'}, {dtype or ''}"


def plot_all(results: Path = RESULTS, out: Path | None = None) -> list[Path]:
    """Draw every figure the rows under results support into out; the paths written."""
    rows = load_rows(results)
    if not rows:
        return []
    plt = pyplot()
    out = Path(out) if out is not None else Path(results) / "plots"
    written = []
    for (workload, device, commit, dtype), group in sorted(_groups(rows).items(), key=lambda kv: repr(kv[0])):
        for i, (x_field, panel_fields) in enumerate(SPEEDUP_AXES.get(workload, ())):
            series = speedup_series(group, x_field, panel_fields)
            if series:
                fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4.5), squeeze=False)
                for ax, (panel, lines) in zip(axes[0], series.items()):
                    for label, pts in lines.items():
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
                    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
                    ax.set_xscale("log", base=2)
                    ax.set_ylim(bottom=0)
                    ax.set_xlabel(X_LABELS.get((workload, x_field), x_field))
                    ax.set_ylabel("speedup (baseline ms / prefix_kernels ms)")
                    ax.set_title(panel, fontsize=9)
                    ax.legend(fontsize=7)
                fig.suptitle(_title("speedup", workload, device, commit, dtype), fontsize=10)
                fig.tight_layout()
                kind = "speedup" if i == 0 else f"speedup_by_{x_field}"  # the first keeps its old file name
                written.append(_save(fig, out / f"{_slug(workload, kind, device, commit, dtype)}.png", plt))
        if workload in MEMORY_WORKLOADS:
            x_field = MEMORY_X.get(workload, "B")
            lines = memory_series(group, x_field)
            if lines:
                fig, ax = plt.subplots(figsize=(6.5, 4.5))
                for label, pts in lines.items():
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
                ax.set_xlabel(MEMORY_X_LABELS.get(workload, "batch size B"))
                ax.set_ylabel("peak memory (MiB)")
                ax.set_ylim(bottom=0)
                ax.legend(fontsize=7)
                fig.suptitle(_title("peak memory", workload, device, commit, dtype), fontsize=10)
                fig.tight_layout()
                written.append(_save(fig, out / f"{_slug(workload, 'memory', device, commit, dtype)}.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of *.jsonl rows (searched recursively)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: RESULTS/plots)")
    args = ap.parse_args(argv)
    try:
        written = plot_all(args.results, args.out)
    except ImportError as exc:
        sys.exit(f"error: {exc}")
    if not written:
        print(f"no plots: {NOTHING_TO_DRAW} under {args.results}")
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
