"""`prefix-kernels demo`: the shipped data, the command line, and a short stock-vs-patched run."""

import json
import threading

import pytest

pytest.importorskip("peft")

from prefix_kernels.cli import commands as cli  # noqa: E402
from prefix_kernels.data import FILE, load_e2e, make_e2e  # noqa: E402
from prefix_kernels.cli.demo import DemoConfig, format_report, summarise, train  # noqa: E402


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


# --- the command line's checks, and a child process that dies ---


@pytest.mark.parametrize("steps", ["0", "-1", "two"])
def test_steps_must_be_a_positive_int(steps, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--steps", steps])
    assert exc.value.code == 2 and "--steps" in capsys.readouterr().err


def test_steps_none_is_the_default_and_a_number_is_kept(monkeypatch):
    from prefix_kernels.cli import demo

    assert DemoConfig.for_device("cpu").steps == 30 and DemoConfig.for_device("cuda").steps == 40
    assert DemoConfig.for_device("cpu", 1).steps == 1
    with pytest.raises(ValueError, match="steps=0"):
        DemoConfig.for_device("cpu", 0)
    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda device, steps: seen.append(steps))
    assert cli.main(["demo", "--device", "cpu", "--steps", "3"]) == 0 and cli.main(["demo", "--device", "cpu"]) == 0
    assert seen == [3, None]


def test_run_demo_refuses_cuda_without_a_device(monkeypatch):
    import torch

    from prefix_kernels.cli import demo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        demo.run_demo("cuda", 2)


def test_a_child_that_dies_is_reported_not_waited_for(capsys):
    """The child crashes (an unknown device) before sending anything: an error within seconds
    (it hung on a blocking queue.get), then a child that succeeds still hands back its result."""
    from prefix_kernels.cli.demo import ChildRunError, _in_child

    small = dict(dtype="float32", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96, batch_size=4,
                 prefix=6, steps=2)
    outcome = []

    def wait_for_the_child():  # in a thread, so that a hang fails the test instead of stalling the run
        try:
            outcome.append(_in_child(DemoConfig(device="foo", **small), patched=False))
        except ChildRunError as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait_for_the_child, daemon=True)
    waiter.start()
    waiter.join(timeout=180)
    assert not waiter.is_alive(), "_in_child still waits for a child that died"
    assert isinstance(outcome[0], ChildRunError)
    assert "stock run failed in its child process (exit code 1)" in str(outcome[0])
    result = _in_child(DemoConfig(device="cpu", **small), patched=False)
    assert len(result["losses"]) == 2


def test_cli_demo_reports_a_failed_child(monkeypatch, capsys):
    from prefix_kernels.cli import demo

    def failing(device, steps):
        raise demo.ChildRunError("the stock run failed in its child process (exit code 1)")

    monkeypatch.setattr(demo, "run_demo", failing)
    assert cli.main(["demo", "--device", "cpu", "--steps", "2"]) == 1
    assert "stock run failed" in capsys.readouterr().err


def test_grpo_demo_loss_curves_agree_and_prompts_are_shared():
    """--task grpo: the stock concatenated rows and completion_logits give the same policy-gradient
    losses step after step (both models train: the curves would part if a gradient differed)."""
    from dataclasses import replace

    from prefix_kernels.cli import demo_grpo

    cfg = replace(demo_grpo.config_for("cpu", 3), hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    stock = demo_grpo.train(cfg, patched=False, progress=False)
    ours = demo_grpo.train(cfg, patched=True, progress=False)
    assert len(stock["losses"]) == len(ours["losses"]) == 3
    for a, b in zip(stock["losses"], ours["losses"]):
        assert abs(a - b) <= 1e-5, (stock["losses"], ours["losses"])
    summary = {"stock_ms": 1.0, "patched_ms": 1.0, "speedup": 1.0, "stock_tok_s": 1.0, "patched_tok_s": 1.0,
               "stock_peak_mib": 1.0, "patched_peak_mib": 1.0}
    report = demo_grpo.format_report(cfg, stock, ours, summary, (200, 20))
    assert "GRPO-style" in report and "loss curves agree" in report
