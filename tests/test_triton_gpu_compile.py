"""Every Triton kernel compiles for sm_80 and sm_90 on a machine without a GPU.

The interpreter lane checks the kernels' arithmetic; this checks what only Triton's compiler
sees. tests/triton_offline_compile.py runs the real launchers with GPU tile sizes and compiles
each launch to a cubin with the installed triton's ptxas (two processes, one per architecture:
about 2.5 minutes on a 2-core machine). Each launch must:

- compile (a kernel the interpreter runs can still be rejected by the GPU backend);
- ask for no more dynamic shared memory than the card has (A100 163 KB, H100 227 KB), or its
  first launch on that card fails;
- keep its stack (where spilled registers go) under STACK_LIMIT bytes per thread. The fp32
  tiles used before this check existed spilled 4-7 KB per thread at D >= 80;
- and the decode own kernel's fused-merge variant (MERGE) no stack at all, at the row blocks
  tiles.merge_fits lets it merge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "triton_offline_compile.py"
ARCHS = (80, 90)
STACK_LIMIT = 256  # bytes per thread: a few spilled registers, not kilobytes
TIMEOUT_S = 1500


def _launched_kernel_names() -> set[str]:
    """The public @triton.jit kernels (helpers start with an underscore and are inlined). In
    this process they may be interpreted (TRITON_INTERPRET=1), hence both classes."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from prefix_kernels.backends.triton.kernels import backward, decode, forward
    from prefix_kernels.backends.vendor import merge_kernel

    return {name for module in (forward, backward, decode, merge_kernel) for name, obj in vars(module).items()
            if isinstance(obj, (JITFunction, InterpretedFunction)) and not name.startswith("_")}


def _compile(arch: int, out: Path) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The kernels of this checkout, whatever an installed (editable) copy of the package points at.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", str(arch), "--out", str(out)],
                              capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {TIMEOUT_S} s"
    return proc.returncode, proc.stderr[-6000:]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia.compiler", reason="this triton has no NVIDIA backend")
    tmp = tmp_path_factory.mktemp("triton_compile")
    with ThreadPoolExecutor(max_workers=len(ARCHS)) as pool:
        runs = {arch: pool.submit(_compile, arch, tmp / f"sm{arch}.json") for arch in ARCHS}
        results = {}
        for arch, fut in runs.items():
            rc, err = fut.result()
            assert rc == 0, f"offline compile for sm_{arch} failed:\n{err}"
            results[arch] = json.loads((tmp / f"sm{arch}.json").read_text())
    return results


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles(compiled, arch):
    launched = {row["kernel"] for row in compiled[arch]["launches"]}
    assert launched == _launched_kernel_names()


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_memory_fits_the_card(compiled, arch):
    over = [row for row in compiled[arch]["launches"] if row["shared_bytes"] > row["max_shared_bytes"]]
    assert not over, json.dumps(over, indent=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_heavy_register_spills(compiled, arch):
    heavy = [row for row in compiled[arch]["launches"] if row["stack_bytes"] > STACK_LIMIT]
    assert not heavy, json.dumps(heavy, indent=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_merge_compiles_without_spills(compiled, arch):
    """The own kernel's fused-merge variant (MERGE: the merge in registers, the output in q's
    dtype) is compiled at every head dim, and at the row blocks tiles.merge_fits lets merge it
    keeps every register: no stack at all."""
    merged = [row for row in compiled[arch]["launches"]
              if row["kernel"] == "decode_own_kernel" and row["constexprs"].get("MERGE") == "True"]
    assert {row["constexprs"]["HEAD_DIM"] for row in merged} == {"16", "64", "128", "256"}
    spilled = [row for row in merged if row["stack_bytes"]]
    assert not spilled, json.dumps(spilled, indent=1)
