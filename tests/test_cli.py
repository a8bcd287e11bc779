"""`prefix-kernels info` and `verify`: they run here, and verify can fail."""

import pytest

from prefix_kernels import cli, torch_backend


def test_info_lists_versions_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("prefix_kernels", "torch", "triton", "CUDA build cache", "decode auto order", "train", "decode",
                 "reference"):
        assert word in out


def test_verify_passes_on_the_torch_backend(capsys):
    assert cli.main(["verify", "--quick", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "all passed" in out and "FAIL" not in out and "decode" in out


def test_verify_fails_on_a_wrong_kernel(monkeypatch, capsys):
    original = torch_backend.forward

    def off_by_a_little(q, k, v, pk, pv, index, mask, causal, scale):
        return original(q, k, v, pk, pv, index, mask, causal, scale * 1.001)  # a 0.1% scale error

    monkeypatch.setattr(torch_backend, "forward", off_by_a_little)
    assert cli.main(["verify", "--quick", "--backend", "torch"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["demo", "info", "verify", "bench"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
