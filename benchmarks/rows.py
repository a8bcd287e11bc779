"""Benchmark rows as data: one JSON object per line, upserted by the row's identity.

Every row carries where it was measured (GPU or CPU name, torch/triton/transformers versions,
package version, git commit) so that a plot or a README number can say where it came from.
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import torch

# Fields that say *what* was measured; a rerun with the same values replaces the old row.
IDENTITY = ("workload", "mode", "provider", "shape", "dtype", "device")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def git_commit() -> str | None:
    """HEAD's short hash, or PREFIX_KERNELS_COMMIT where there is no .git (a lent GPU machine
    receives the working tree without it)."""
    import os

    if os.environ.get("PREFIX_KERNELS_COMMIT"):
        return os.environ["PREFIX_KERNELS_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    """Where the numbers come from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu:{platform.processor() or platform.machine()}"
    import prefix_kernels

    return {
        "device": name,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "prefix_kernels": prefix_kernels.__version__,
        "commit": git_commit(),
    }


def upsert(path: Path, rows: list[dict]) -> None:
    """Write rows into path, replacing any earlier row with the same identity."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                kept[tuple(json.dumps(row.get(f), sort_keys=True) for f in IDENTITY)] = row
    for row in rows:
        kept[tuple(json.dumps(row.get(f), sort_keys=True) for f in IDENTITY)] = row
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept.values()))


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
