"""`prefix-kernels demo`: the shipped data, the command line, and a short stock-vs-patched run."""

import json

import pytest

pytest.importorskip("peft")

from prefix_kernels import cli  # noqa: E402
from prefix_kernels.data import FILE, load_e2e, make_e2e  # noqa: E402
from prefix_kernels.demo import DemoConfig, format_report, summarise, train  # noqa: E402


def test_shipped_data_is_the_generator_output():
    rows = load_e2e()
    assert rows == json.loads(json.dumps(make_e2e()))  # e2e_synthetic.jsonl has not drifted
    assert len(rows) == 600 and all(r["table"].startswith("name[") and r["text"] for r in rows)
    assert FILE.endswith(".jsonl")


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    assert "stock" in capsys.readouterr().out


def test_short_demo_run_loss_curves_agree():
    """Five steps of a smaller model, stock PEFT + SDPA and patched, in this process."""
    cfg = DemoConfig("cpu", "float32", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96,
                     batch_size=4, prefix=6, steps=5)
    stock = train(cfg, patched=False, progress=False)
    ours = train(cfg, patched=True, progress=False)
    import prefix_kernels

    prefix_kernels.revert_prefix_kernels()
    summary = summarise(cfg, stock, ours, warmup=1)
    assert summary["max_rel_loss_diff"] <= 1e-5
    assert stock["losses"][-1] < stock["losses"][0]  # it trains
    report = format_report(cfg, stock, ours, summary)
    assert "loss curves agree" in report and "median step" in report
