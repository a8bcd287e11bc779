"""`prefix-kernels info` and `verify`: they run here, and verify can fail."""

import pytest

from prefix_kernels.backends import cpu_kernel
from prefix_kernels.backends import torch_split as torch_backend
from prefix_kernels.cli import commands as cli


def test_info_lists_versions_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("prefix_kernels", "torch", "triton", "build cache", "decode auto order", "train", "decode",
                 "reference"):
        assert word in out


def test_info_names_the_environment_variables_set(capsys, monkeypatch):
    """A PREFIX_KERNELS_* variable shows with its effect; a misspelt one is called out, since
    nothing reads it."""
    monkeypatch.setenv("PREFIX_KERNELS_DISABLE_CUDA", "1")
    monkeypatch.setenv("PREFIX_KERNEL_BACKEND", "torch")
    assert cli.main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(l.startswith("PREFIX_KERNELS_DISABLE_CUDA") and "CUDA decode backend off" in l for l in lines)
    assert any(l.startswith("PREFIX_KERNEL_BACKEND") and "not read by prefix_kernels" in l for l in lines)


def test_verify_passes_on_the_torch_backend(capsys):
    assert cli.main(["verify", "--quick", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "all passed" in out and "FAIL" not in out and "decode" in out


def test_verify_fails_on_a_wrong_kernel(monkeypatch, capsys):
    original = torch_backend.forward  # the same results as the one-pass kernel's, within the bound

    def off_by_a_little(q, k, v, pk, pv, index, mask, causal, scale):
        return original(q, k, v, pk, pv, index, mask, causal, scale * 1.001)  # a 0.1% scale error

    monkeypatch.setattr(torch_backend, "forward", off_by_a_little)
    monkeypatch.setattr(cpu_kernel, "forward", off_by_a_little)  # float32 CPU cases take the one-pass kernel
    assert cli.main(["verify", "--quick", "--backend", "torch"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["demo", "info", "verify", "bench"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0


# --- bad input: an argparse error naming the flag (exit 2), never "all passed" over nothing checked ---


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("backend", ["nonsense", "reference"])
def test_verify_refuses_a_backend_it_does_not_check(backend, capsys):
    err = _usage_error(["verify", "--quick", "--backend", backend], capsys)
    assert "--backend" in err and "invalid choice" in err


def test_verify_backend_choices_are_the_ones_verify_checks():
    from prefix_kernels.cli import verify

    assert cli.VERIFY_BACKENDS == verify.BACKENDS
    with pytest.raises(ValueError, match="reference"):
        verify.run(quick=True, backends=["reference"], printer=lambda line: None)


def test_verify_fails_when_no_backend_can_run(monkeypatch):
    """Every backend turned away: each gets a line saying why, and the run fails."""
    from prefix_kernels.cli import verify

    for table in (verify.REASONS, verify.DECODE_REASONS):
        for name in ("triton", "torch", "cuda"):
            if name in table:
                monkeypatch.setitem(table, name, lambda p, name=name: [f"{name} cannot run here"])
    lines = []
    assert verify.run("cpu", quick=True, backends=["triton", "torch"], printer=lines.append) is False
    assert "triton: skipped: train: triton cannot run here" in lines
    assert "torch: skipped: train: torch cannot run here" in lines
    assert not any("cuda" in line for line in lines)  # not asked for
    assert "all passed" not in lines and lines[-1].startswith("nothing was checked")


def test_verify_reports_a_backend_that_ran_nothing(monkeypatch, capsys):
    from prefix_kernels.cli import verify

    monkeypatch.setitem(verify.DECODE_REASONS, "cuda",
                        lambda p: ["CUDA kernels need CUDA tensors, got cpu"])
    assert cli.main(["verify", "--quick", "--device", "cpu", "--backend", "cuda"]) == 1
    out = capsys.readouterr().out
    assert "cuda: skipped: decode: CUDA kernels need CUDA tensors" in out
    assert "nothing was checked" in out and "all passed" not in out


@pytest.mark.parametrize("command", ["verify", "demo"])
def test_device_is_checked_up_front(command, monkeypatch, capsys):
    import torch

    assert "--device" in _usage_error([command, "--device", "foo"], capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _usage_error([command, "--device", "cuda"], capsys)
    assert "--device" in err and "no CUDA device" in err
    assert cli.device_arg("cpu") == "cpu"
