"""prefix_kernels.cuda without a GPU: reasons, cache layout, build lock, failure reporting, fake."""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import prefix_kernels
from prefix_kernels.backends import cuda
from prefix_kernels._core.problem import Problem
from prefix_kernels import jit
from prefix_kernels._core import env
from prefix_kernels.backends.cuda import build


def problem(device="cuda", dtype=torch.float16, D=128, Lq=1, **kw) -> Problem:
    sizes = dict(B=4, Hq=8, Hkv=2, Lq=Lq, Lk=37, D=D, G=2, P=5)
    sizes.update(kw)
    return Problem(dtype=dtype, device=torch.device(device), **sizes)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A clean build state, the cache in a temporary directory, no arch list from the caller."""
    monkeypatch.setenv(env.CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(env.DISABLE_CUDA, raising=False)
    monkeypatch.delenv(env.TORCH_CUDA_ARCH_LIST, raising=False)
    build.reset_for_tests()
    yield tmp_path / "cache"
    build.reset_for_tests()


def test_import_builds_nothing_and_exposes_two_functions():
    assert cuda.__all__ == ["decode_reasons", "decode_forward"]
    code = textwrap.dedent("""
        import torch
        import prefix_kernels.backends.cuda as c
        from prefix_kernels.backends.cuda import build
        assert not build._BUILD.loaded and build._BUILD.error is None, "built at import"
        assert not torch.cuda.is_initialized(), "touched CUDA at import"
        assert hasattr(torch.ops.prefix_kernels, "decode_cuda")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_cpu_tensors_are_declined():
    reasons = cuda.decode_reasons(problem(device="cpu"))
    assert reasons == ["not CUDA tensors (device cpu)"]


@pytest.mark.parametrize("value, off", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_disabled_by_env(monkeypatch, value, off):
    monkeypatch.setenv(env.DISABLE_CUDA, value)
    assert build.disabled() is off
    reasons = cuda.decode_reasons(problem(device="cpu"))
    assert any("disabled by PREFIX_KERNELS_DISABLE_CUDA" in r for r in reasons) is off


def test_disabled_cuda_case_needs_no_gpu(monkeypatch):
    monkeypatch.setenv(env.DISABLE_CUDA, "1")
    monkeypatch.setattr(build, "ensure_loaded", lambda: pytest.fail("must not build when disabled"))
    assert cuda.decode_reasons(problem()) == ["disabled by PREFIX_KERNELS_DISABLE_CUDA=1"]


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(D=48), "head dim 48 is not compiled"),
        (dict(D=192), "head dim 192 is not compiled"),
        (dict(Lq=17), "Lq=17 query rows per request"),
        (dict(dtype=torch.float64), "dtype torch.float64"),
        (dict(Hkv=3), "not a multiple of Hkv=3"),
    ],
)
def test_unsupported_cases_are_declined_without_building(monkeypatch, kw, expected):
    monkeypatch.setattr(build, "ensure_loaded", lambda: pytest.fail("must not build for a declined case"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: pytest.fail("must not query the GPU"))
    reasons = cuda.decode_reasons(problem(**kw))
    assert any(expected in r for r in reasons), reasons


def test_old_gpu_is_declined(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    monkeypatch.setattr(build, "ensure_loaded", lambda: pytest.fail("must not build for sm_75"))
    (reason,) = cuda.decode_reasons(problem())
    assert "compute capability 8.0" in reason and "7.5" in reason


def test_decode_reasons_never_raises(monkeypatch):
    # On a CPU-only torch the capability query itself raises; it must come back as a reason.
    reasons = cuda.decode_reasons(problem())
    assert isinstance(reasons, list) and reasons and all(isinstance(r, str) for r in reasons)

    def boom(*a, **k):
        raise ValueError("driver on fire")

    monkeypatch.setattr(torch.cuda, "get_device_capability", boom)
    (reason,) = cuda.decode_reasons(problem())
    assert "driver on fire" in reason
    assert cuda.decode_reasons(object()) and cuda.decode_reasons(None)  # nonsense in, reasons out


BUILD_LOG = textwrap.dedent(
    """\
    Error building extension 'prefix_kernels_cuda': [1/3] /usr/local/cuda/bin/nvcc -Werror all-warnings -c x.cu
    FAILED: shared_prefix_decode.cuda.o
    /work/csrc/shared_prefix_decode.cuh(120): error: identifier "foo" is undefined
    1 error detected in the compilation of "/work/csrc/shared_prefix_decode.cu".
    ninja: build stopped: subcommand failed.
    """
)


def test_first_error_line():
    assert jit.first_error_line(BUILD_LOG) == '/work/csrc/shared_prefix_decode.cuh(120): error: identifier "foo" is undefined'
    assert jit.first_error_line("x.h:9:10: fatal error: y.h: No such file") == "x.h:9:10: fatal error: y.h: No such file"
    assert jit.first_error_line("\n  something odd\nmore") == "something odd"
    assert jit.first_error_line("") == ""


def test_build_failure_is_a_reason_and_one_warning(monkeypatch, fresh_build, caplog):
    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError(BUILD_LOG)

    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(build, "find_nvcc", lambda: "/usr/bin/true")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with caplog.at_level(logging.WARNING, logger="prefix_kernels"):
        first = cuda.decode_reasons(problem())
        second = cuda.decode_reasons(problem(dtype=torch.bfloat16))
    assert first == second and len(first) == 1
    assert first[0].startswith('build failed: /work/csrc/shared_prefix_decode.cuh(120): error: identifier "foo"')
    assert len(calls) == 1, "a failed build is not retried in the same process"
    warnings = [r.getMessage() for r in caplog.records if r.name == "prefix_kernels" and r.levelno == logging.WARNING]
    failures = [w for w in warnings if "unavailable" in w]
    assert len(failures) == 1 and "identifier" in failures[0]
    assert [w for w in warnings if "building" in w] == [  # the build was announced once, before it ran
        f"prefix_kernels: building the CUDA decode kernels with nvcc (about a minute) (once; cached in "
        f"{jit.cache_dir('sm_90')})"]
    # What load() was asked to do: our sources, the cache directory, the GPU's arch, no Python module.
    kw = calls[0]
    assert [Path(s).name for s in kw["sources"]] == ["shared_prefix_decode.cu", "torch_binding.cpp"]
    assert Path(kw["build_directory"]).is_relative_to(fresh_build / prefix_kernels.__version__ / "sm_90")
    assert "-gencode=arch=compute_90,code=sm_90" in kw["extra_cuda_cflags"]
    assert kw["is_python_module"] is False
    log = Path(kw["build_directory"]) / "build-error.log"
    assert log.read_text() == BUILD_LOG
    # The op itself raises with the same reason (the dispatcher is expected to ask first).
    with pytest.raises(RuntimeError, match="CUDA decode kernels are unavailable: build failed"):
        cuda._decode_impl(*([None] * 7), True, 1.0)
    assert len(calls) == 1


def test_missing_nvcc_is_a_reason(monkeypatch, fresh_build):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    assert cuda.decode_reasons(problem()) == ["nvcc not found (set CUDA_HOME or put nvcc on PATH)"]


def test_arch_list_respects_torch_cuda_arch_list(monkeypatch, fresh_build):
    monkeypatch.setenv(env.TORCH_CUDA_ARCH_LIST, "8.0;9.0a 8.6+PTX")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: pytest.fail("must not query devices"))
    archs = build.arch_list()
    assert archs == ["8.0", "9.0a", "8.6+PTX"]
    assert build.arch_tag(archs) == "sm_80-sm_90a-sm_86+ptx"
    assert build.gencode_flags(["9.0a", "8.6+PTX"]) == [
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_86,code=sm_86",
        "-gencode=arch=compute_86,code=compute_86",
    ]


def test_arch_list_from_visible_gpus(monkeypatch, fresh_build):
    caps = {0: (9, 0), 1: (8, 0), 2: (9, 0)}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: caps[i])
    assert build.arch_list() == ["8.0", "9.0"]
    assert build.arch_tag(build.arch_list()) == "sm_80-sm_90"


def test_cache_path_has_version_arch_and_torch(monkeypatch, tmp_path):
    monkeypatch.setenv(env.CACHE, str(tmp_path))
    d = jit.cache_dir(build.arch_tag(["9.0"]))
    assert d.parent == tmp_path / prefix_kernels.__version__ / "sm_90"
    assert d.name.startswith("torch" + torch.__version__.split("+")[0])
    monkeypatch.delenv(env.CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jit.cache_root() == tmp_path / "xdg" / "prefix_kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert jit.cache_root() == Path.home() / ".cache" / "prefix_kernels"


def test_sources_are_found_in_the_checkout():
    src = jit.csrc_dir(build.SOURCES + build.HEADERS)
    assert src is not None
    assert {p.name for p in src.iterdir()} >= set(build.SOURCES + build.HEADERS)


def test_lock_excludes_threads(tmp_path):
    lock = tmp_path / "build.lock"
    inside = []
    overlaps = []

    def worker(i):
        for _ in range(3):
            with jit.file_lock(lock):
                inside.append(i)
                if len(inside) > 1:
                    overlaps.append(tuple(inside))
                time.sleep(0.01)
                inside.remove(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []


def test_lock_excludes_processes(tmp_path):
    import fcntl

    lock = tmp_path / "build.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from prefix_kernels.jit import file_lock
            with file_lock(__import__("pathlib").Path({str(lock)!r})):
                print("held", flush=True)
                sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with open(lock, "a+") as f:
            with pytest.raises(BlockingIOError):
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.wait(timeout=60) == 0
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the holder exits
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    finally:
        if holder.poll() is None:
            holder.kill()


def test_fake_gives_the_real_layout():
    m = lambda *s, dtype=torch.bfloat16: torch.empty(*s, dtype=dtype, device="meta")  # noqa: E731
    B, Hq, Hkv, Lq, T, D, G, P = 3, 8, 2, 4, 37, 64, 2, 5
    out, lse = torch.ops.prefix_kernels.decode_cuda(
        m(B, Hq, Lq, D), m(B, Hkv, T, D), m(B, Hkv, T, D), m(G, Hkv, P, D), m(G, Hkv, P, D),
        m(B, dtype=torch.long), m(B, T, dtype=torch.bool), True, 0.125,
    )
    assert out.shape == (B, Hq, Lq, D) and out.dtype == torch.bfloat16
    assert out.transpose(1, 2).is_contiguous()  # memory (B, Lq, Hq, D)
    assert lse.shape == (B, Hq, Lq) and lse.dtype == torch.float32 and lse.is_contiguous()


@pytest.mark.parametrize("loaded", [None, "nvcc not found"], ids=["built", "unbuildable"])
def test_dispatch_traces_under_compile(monkeypatch, loaded):
    """The decode dispatcher asks these kernels for reasons inside torch.compile'd generation
    (prefix_kernels.generate, a compiled decode step): the GPU query and the build happen once,
    at trace time, as constants, never as traced code (a file lock and a compiler cannot be
    traced). Simulated here: a CUDA problem, a capability and a build result, all on a CPU."""
    from prefix_kernels.backends import registry

    def ensure_loaded():  # like the real one, untraceable: it takes a file lock
        with open(os.devnull) as f:
            f.read()
        return loaded

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(build, "ensure_loaded", ensure_loaded)
    p = problem()
    eager = registry.public_reasons("cuda", p, decode=True)
    assert eager == ([] if loaded is None else [loaded])

    def step(x):
        return x + len(registry.public_reasons("cuda", p, decode=True))

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    assert float(compiled(torch.zeros(()))) == len(eager)


def test_a_damaged_cached_library_is_found(tmp_path):
    """dlopen maps a truncated .so and dies of SIGBUS when it touches the missing pages (a cached
    library cut to 64 KiB killed every later process): such a file must be recognised first."""
    whole = Path(torch.__file__).parent / "lib" / "libc10.so"
    assert jit.damaged_library(whole) is None
    data = whole.read_bytes()
    # Cut inside the last segment that dlopen maps: the file's end need not be in it (torch 2.11's
    # libc10.so has one unmapped byte after its last PT_LOAD segment; torch 2.13's, section headers).
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    segments = [struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize) for i in range(phnum)]
    mapped_end = max(offset + filesz for p_type, _, offset, _, _, filesz in segments if p_type == 1)
    for size in (100, 65536, mapped_end - 1):
        cut = tmp_path / f"cut{size}.so"
        cut.write_bytes(data[:size])
        assert "truncated" in jit.damaged_library(cut)
    (tmp_path / "empty.so").write_bytes(b"")
    assert "not an ELF library" in jit.damaged_library(tmp_path / "empty.so")


def test_a_damaged_cached_library_is_built_again(tmp_path, monkeypatch, caplog):
    from torch.utils import cpp_extension

    (tmp_path / "ext.so").write_bytes((Path(torch.__file__).parent / "lib" / "libc10.so").read_bytes()[:4096])
    seen = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.append((tmp_path / "ext.so").exists()))
    with caplog.at_level(logging.WARNING, logger="prefix_kernels"):
        jit.load_locked(tmp_path, name="ext", sources=[])
    assert seen == [False]  # removed before the build, so that ninja links it again
    assert any("damaged" in r.getMessage() for r in caplog.records)


def test_load_errors_keep_the_loader_reason_and_a_read_only_cache_is_named(tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    def load(**kw):
        try:
            raise OSError("ext.so: cannot read file data: Error 21")
        except OSError as inner:
            raise RuntimeError("Could not load this library: ext.so") from inner

    monkeypatch.setattr(cpp_extension, "load", load)
    with pytest.raises(jit.BuildError, match="Could not load this library.*cannot read file data"):
        jit.load_locked(tmp_path, name="ext", sources=[])
    (tmp_path / "file").write_text("")
    with pytest.raises(jit.BuildError, match="cannot lock the build cache .* must be writable"):
        jit.load_locked(tmp_path / "file" / "cache", name="ext", sources=[])


def test_a_wait_for_the_build_lock_is_announced(tmp_path, caplog):
    lock = tmp_path / "build.lock"
    entered, release = threading.Event(), threading.Event()

    def holder():
        with jit.file_lock(lock):
            entered.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    entered.wait(30)
    threading.Timer(0.5, release.set).start()
    with caplog.at_level(logging.WARNING, logger="prefix_kernels"), jit.file_lock(lock):
        pass
    t.join()
    assert any("waiting for the build lock" in r.getMessage() for r in caplog.records)


def test_a_missing_compiler_is_named(monkeypatch):
    from torch.utils import cpp_extension

    from prefix_kernels.backends import cpu_kernel

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)  # checked first
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(jit.BuildError, match="no C\\+\\+ compiler: '/nonexistent/c\\+\\+' not found"):
        cpu_kernel._build_and_load()
