"""Benchmark rows as data: one JSON object per line, upserted by the row's identity.

Every row carries where it was measured (GPU or CPU name, torch/triton/transformers versions,
package version, git commit) so that a plot or a README number can say where it came from.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

from prefix_kernels.cli.commands import positive_int  # noqa: F401  (the scripts' argparse type)

# Fields that say *what* was measured; a rerun with the same values replaces the old row. "smoke"
# (tiny shapes, run so that the scripts do not rot) keeps such rows from replacing measured ones;
# plots and the headline leave them out.
IDENTITY = ("workload", "mode", "provider", "shape", "dtype", "device", "smoke")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


@lru_cache(maxsize=None)
def git_commit() -> str | None:
    """HEAD's short hash, with "-dirty" when tracked files other than the stored rows differ from it;
    PREFIX_KERNELS_COMMIT only where there is no git checkout (a lent GPU machine receives the
    working tree without .git). Read once per process: the rows a run writes must not change it."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=here).stdout.strip()
    except Exception:
        return os.environ.get("PREFIX_KERNELS_COMMIT") or None
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                              ":(exclude,top)benchmarks/results"], capture_output=True, text=True, cwd=here)
    return head + ("-dirty" if changed.returncode == 0 and changed.stdout.strip() else "")


def _cpu_name() -> str:
    """The CPU's model name (rows from two CPU machines must not replace each other)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, smoke: bool = False) -> dict:
    """Where the numbers come from, and whether they are a smoke run's."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu:{_cpu_name()}"
    import prefix_kernels

    return {
        "smoke": bool(smoke),
        "device": name,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "prefix_kernels": prefix_kernels.__version__,
        "commit": git_commit(),
    }


# Datasheet HBM bandwidth in GB/s (1e9 bytes/s), keyed by a substring of torch.cuda.get_device_name,
# the first that matches: NVIDIA's datasheets. The H100 SXM reports itself as "NVIDIA H100 80GB
# HBM3"; the PCIe and NVL cards have other names and other figures, and are left out until a row
# needs them (their rows say so) rather than matched to the SXM's figure.
DATASHEET_HBM_GBPS = (
    ("H200", 4800.0, "NVIDIA H200 (SXM and NVL) datasheet: 4.8 TB/s"),
    ("H100 80GB HBM3", 3350.0, "NVIDIA H100 SXM datasheet: 3.35 TB/s"),
    ("H100 SXM", 3350.0, "NVIDIA H100 SXM datasheet: 3.35 TB/s"),
)


def datasheet_hbm(device: torch.device) -> dict:
    """hbm_datasheet_gbps (null where unknown), hbm_datasheet (the GPU and the figure's source)
    and, when null, hbm_datasheet_reason: the row fields beside a measured copy rate."""
    if device.type != "cuda":
        return dict(hbm_datasheet_gbps=None, hbm_datasheet=None, hbm_datasheet_reason="no GPU: a CPU run")
    name = torch.cuda.get_device_name(device)
    for key, gbps, source in DATASHEET_HBM_GBPS:
        if key in name:
            return dict(hbm_datasheet_gbps=gbps, hbm_datasheet=f"{name}: {source}")
    return dict(hbm_datasheet_gbps=None, hbm_datasheet=None,
                hbm_datasheet_reason=f"{name!r} is not in rows.DATASHEET_HBM_GBPS: add its datasheet HBM bandwidth")


def _identity(row: dict) -> tuple:
    # rows written before "smoke" existed were all measured ones: a missing field reads as False
    return tuple(json.dumps(row.get(f, False if f == "smoke" else None), sort_keys=True) for f in IDENTITY)


def read_rows(path: Path) -> list[dict]:
    """The rows of one JSON-lines file; a line that is not JSON raises, naming the file and line."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON row ({exc.msg}); fix or delete that line") from None
    return rows


def upsert(path: Path, rows: list[dict]) -> None:
    """Write rows into path, replacing any earlier row with the same identity. The file is replaced
    whole (written beside it, then renamed), so a run killed mid-write leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = {}
    if path.exists():
        for row in read_rows(path):
            kept[_identity(row)] = row
    for row in rows:
        kept[_identity(row)] = row
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept.values()))
    os.replace(tmp, path)


def with_prediction(row: dict) -> dict:
    """The row with the analytic model's `predicted_ms` and `predicted_bound` (analytic.py)
    beside its measurement, for the workloads the model covers (attention, decode)."""
    if row.get("workload") in ("attention", "decode") and "predicted_ms" not in row:
        import analytic  # beside this file; benchmarks/ is on the path of every script that imports rows

        try:
            prediction = analytic.for_row(row)
        except (KeyError, TypeError) as exc:  # a row without the shape fields the model reads
            prediction = dict(predicted_ms=None, bound=f"no prediction ({type(exc).__name__}: {exc})")
        row["predicted_ms"], row["predicted_bound"] = prediction["predicted_ms"], prediction["bound"]
    return row


class Progress:
    """A benchmark's cases as they finish: each row is upserted into `results` at once (a run cut
    short keeps what it measured), its line is printed, and on a terminal a progress bar (tqdm)
    counts the cases done out of `total`. Without a terminal (a log file, CI) or without tqdm
    there is no bar, only the lines.

        progress = Progress(results, total=len(shapes) * len(providers), desc="decode")
        for ...:
            progress.add(row, line)
        progress.close()
        return progress.rows
    """

    def __init__(self, results: Path, total: int, desc: str):
        self.results, self.rows = results, []
        try:
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal
            self.bar = tqdm(total=total, desc=desc, unit="case", disable=None, leave=False, dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def add(self, row: dict, line: str) -> None:
        with_prediction(row)
        self.rows.append(row)
        upsert(self.results, [row])
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line)
            self.bar.update(1)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
