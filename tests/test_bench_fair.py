"""Fair baselines (issue 17), checked on the CPU at smoke sizes: the attention benchmark times G > 1
and kv_mask variants and names the SDPA backend that ran, with the HF mask built once outside the
timed call; the Flex provider is compiled whole; the training-step benchmark alternates its
providers step by step and records p20/p80; the decode benchmark records the datasheet-HBM and
CUDA-graph fields (null on a CPU, with the reason) and skips a missing FlashInfer loudly; a backend
that is unknown or declines makes a skipped row with the reason, not a crash."""

import json
import os
import sys
import time

import pytest
import torch

from helpers import benchmark_module


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- attention


def test_attention_times_g_and_kv_mask_variants_and_names_the_sdpa_backend(tmp_path, monkeypatch):
    bench = benchmark_module("bench_attention")
    sdpa = benchmark_module("sdpa")
    built = []
    real_mask = bench.hf_mask
    monkeypatch.setattr(bench, "hf_mask", lambda *a: built.append(a) or real_mask(*a))
    out = tmp_path / "attention.jsonl"
    bench.main(["--smoke", "--out", str(out), "--providers", "prefix_kernels", "sdpa_copied",
                "--variants", "base", "G", "kv_mask", "G_kv_mask"])
    rows = _rows(out)
    assert len(rows) == (2 + 3) * 2 * 2  # base at two P, three variants at one; 2 modes; 2 providers
    for row in rows:
        assert row["status"] == "ok", row
        for field in ("device", "torch", "triton", "transformers", "commit", "prefix_kernels", "variant"):
            assert field in row
    seen = {(r["shape"]["G"], r["shape"]["kv_mask"]) for r in rows}
    assert seen == {(1, False), (4, False), (1, True), (4, True)}
    assert all(r["shape"]["L"] == r["shape"]["Lq"] == r["shape"]["Lk"] for r in rows)
    sdpa_rows = [r for r in rows if r["provider"] == "sdpa_copied"]
    for row in sdpa_rows:
        assert row["sdpa_backend"] in sdpa.ORDER and row["sdpa_order"] == list(sdpa.ORDER)
        assert set(row["sdpa_declined"]) == set(sdpa.ORDER[:sdpa.ORDER.index(row["sdpa_backend"])])
        assert row["mask_built"].startswith("once per forward")
    assert len(built) == len(sdpa_rows)  # once per row, before the timing: never inside the timed call
    assert "sdpa_backend" not in {k for r in rows if r["provider"] == "prefix_kernels" for k in r}
    # padded keys are not counted as work
    padded = [r for r in rows if r["shape"]["kv_mask"] and r["provider"] == "sdpa_copied" and r["mode"] == "fwd"]
    s = padded[0]["shape"]
    assert bench.flops(s["B"], s["Hq"], s["L"], s["P"], s["D"], "fwd", bench.padding_of(s["B"], s["L"])) < \
        bench.flops(s["B"], s["Hq"], s["L"], s["P"], s["D"], "fwd")


@pytest.mark.parametrize("variant", ["base", "G", "kv_mask", "G_kv_mask"])
def test_every_attention_provider_computes_the_same_thing(variant, monkeypatch):
    """The baselines' G > 1 and kv_mask arithmetic (the prefixes laid end to end for Flex, pk[index]
    for SDPA, the padding in both masks) against the package's reference backend; Flex's body run
    eagerly through its test seam (inductor does not compile Flex with its lse on a CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    from prefix_kernels import shared_prefix_attention

    bench = benchmark_module("bench_attention")
    monkeypatch.setattr(bench, "compiled_flex_attention", lambda: flex_attention)
    c = bench.case(variant, 4, 4, 2, 32, 16, 32)
    t = bench.make_case(c, torch.float32, torch.device("cpu"))
    args = [t[n].detach() for n in ("q", "k", "v", "pk", "pv")]
    want = shared_prefix_attention(*args, prefix_index=t["prefix_index"], kv_mask=t["kv_mask"], backend="reference")
    for name in ("sdpa_copied", "flex_broadcast"):
        torch.testing.assert_close(bench.bind(name, t)(*args), want, rtol=1e-5, atol=1e-5, msg=name)


def test_flex_provider_is_compiled_whole():
    """One torch.compile around both Flex calls and the LSE merge, not a compiled flex_attention
    called twice with the merge in eager mode."""
    bench = benchmark_module("bench_attention")
    flex = benchmark_module("flex")
    whole = bench._flex_whole()
    assert whole is flex.compiled(bench.flex_broadcast) and whole is not flex.compiled_flex_attention()
    assert getattr(whole, "_torchdynamo_orig_callable", None) is bench.flex_broadcast


def test_flex_rows_record_their_compile_cap_and_a_cpu_skip(tmp_path):
    bench = benchmark_module("bench_attention")
    out = tmp_path / "attention.jsonl"
    bench.main(["--smoke", "--out", str(out), "--compiling", "only", "--compile-cap-s", "50"])
    rows = _rows(out)
    assert {r["provider"] for r in rows} == {"flex_broadcast"} and len(rows) == 2 * 2
    for row in rows:  # compiled Flex does not run on a CPU: said, not dropped
        assert row["status"] == "skipped" and row["reason"]
        assert row["compile_cap_s"] == 50 and row["compiled"].startswith("the whole provider")


def test_a_compile_past_its_cap_stops(monkeypatch):
    timing = benchmark_module("timing")
    t0 = time.perf_counter()
    with pytest.raises(timing.TimeLimit, match="limit of 0.2 s"):
        timing.warm(lambda: time.sleep(5), torch.device("cpu"), 0.2)
    assert time.perf_counter() - t0 < 3
    fields = timing.warm(lambda: None, torch.device("cpu"), 10)
    assert fields["compile_cap_s"] == 10 and fields["compile_s"] >= 0


def test_sdpa_takes_the_first_backend_in_order_that_runs():
    sdpa = benchmark_module("sdpa")

    def step():  # as torch does when the pinned kernel cannot take the inputs
        if torch.backends.cuda.flash_sdp_enabled():
            raise RuntimeError("No available kernel. Aborting execution.")

    name, context, declined = sdpa.pick_backend(step, torch.device("cpu"))
    assert name == "EFFICIENT_ATTENTION" and list(declined) == ["FLASH_ATTENTION"]
    assert "No available kernel" in declined["FLASH_ATTENTION"]
    with context():
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()


@pytest.mark.parametrize("error", ["NoBackendError", "ValueError"])
def test_a_declining_composed_backend_is_a_skipped_row(tmp_path, monkeypatch, error):
    import prefix_kernels

    bench = benchmark_module("bench_attention")
    exc = getattr(prefix_kernels, error) if error == "NoBackendError" else ValueError

    def declines(*args, **kwargs):
        raise exc("composed: declined for a reason")

    monkeypatch.setitem(bench.PROVIDERS, "prefix_kernels_composed", declines)
    out = tmp_path / "attention.jsonl"
    bench.main(["--smoke", "--out", str(out), "--providers", "prefix_kernels_composed"])
    rows = _rows(out)
    assert len(rows) == 2 * 2
    assert all(r["status"] == "skipped" and "declined for a reason" in r["reason"] for r in rows)


# ---------------------------------------------------------------- training step


def test_train_step_alternates_its_providers_and_records_p20_p80(tmp_path):
    pytest.importorskip("peft")
    bench = benchmark_module("bench_train_step")
    out = tmp_path / "train.jsonl"
    bench.main(["--smoke", "--out", str(out), "--steps", "5"])
    rows = _rows(out)
    names = ["peft_sdpa", "peft_eager", "prefix_kernels"]
    assert [r["provider"] for r in rows] == names
    log = rows[0]["step_log"]
    assert len(log) == 5 * 3 and all(r["step_log"] == log for r in rows)
    assert all(a != b for a, b in zip(log, log[1:]))  # interleaved: never the same provider twice in a row
    assert all(sorted(log[i:i + 3]) == sorted(names) for i in range(0, len(log), 3))  # every round runs each
    assert log[:3] != log[3:6]  # rounds rotate
    for row in rows:
        assert row["status"] == "ok", row.get("reason")
        assert row["steps"] == 5 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["order"].startswith("alternated")


def test_train_step_defaults_to_20_alternated_steps_on_a_gpu(monkeypatch):
    bench = benchmark_module("bench_train_step")
    seen = {}
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run", lambda *a, **k: seen.update(args=a, kwargs=k))
    bench.main([])
    assert seen["args"][7] == 20 and "prefix_kernels_composed" in seen["args"][4]
    timing = benchmark_module("timing")
    order, last = [], None
    for i in range(4):  # two providers: A B A B ..., not A B B A
        order += timing.round_order(["a", "b"], i, last)
        last = order[-1]
    assert order == ["a", "b"] * 4


def test_train_step_composed_runs_or_says_why(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    bench = benchmark_module("bench_train_step")
    before = os.environ.get("PREFIX_KERNELS_BACKEND")
    out = tmp_path / "train.jsonl"
    bench.main(["--smoke", "--out", str(out), "--steps", "2", "--providers", "peft_sdpa", "prefix_kernels_composed"])
    row = {r["provider"]: r for r in _rows(out)}["prefix_kernels_composed"]
    assert row["backend_env"] == {"PREFIX_KERNELS_BACKEND": "composed"}
    assert row["status"] == "ok" or row["reason"], row
    # a backend name the package does not know: skipped with the reason, the other provider timed
    monkeypatch.setitem(bench.BACKEND_OF, "prefix_kernels_composed", "no_such_backend")
    bench.main(["--smoke", "--out", str(out), "--steps", "2", "--providers", "peft_sdpa", "prefix_kernels_composed"])
    rows = {r["provider"]: r for r in _rows(out)}
    assert rows["prefix_kernels_composed"]["status"] == "skipped"
    assert "no_such_backend" in rows["prefix_kernels_composed"]["reason"]
    assert rows["peft_sdpa"]["status"] == "ok"
    assert os.environ.get("PREFIX_KERNELS_BACKEND") == before  # set around the provider's steps only


# ---------------------------------------------------------------- decode


def test_decode_records_hbm_and_graph_fields_and_skips_flashinfer_loudly(tmp_path, monkeypatch, capsys):
    bench = benchmark_module("bench_decode")
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # absent, whatever is installed here
    out = tmp_path / "decode.jsonl"
    bench.main(["--smoke", "--out", str(out), "--providers", "sdpa_expanded", "flashinfer_cascade"])
    rows = _rows(out)
    assert len(rows) == 2 * 2
    for row in rows:
        assert row["hbm_datasheet_gbps"] is None and row["hbm_datasheet_reason"]
        assert "copy_frac_hbm_datasheet" in row
    for row in (r for r in rows if r["provider"] == "sdpa_expanded"):
        assert row["status"] == "ok" and row["sdpa_backend"]
        assert row["graph_ms"] is None and "CUDA" in row["graph_reason"]
        assert row["frac_hbm_datasheet"] is None
    for row in (r for r in rows if r["provider"] == "flashinfer_cascade"):
        assert row["status"] == "skipped" and row["warning"]
        assert row["reason"].split(":")[0] in ("ImportError", "ModuleNotFoundError") and "flashinfer" in row["reason"]
    assert "WARNING: FlashInfer is not importable" in capsys.readouterr().err


def test_datasheet_bandwidth_by_gpu_name(monkeypatch):
    rows = benchmark_module("rows")
    cuda = torch.device("cuda")
    for name, gbps in (("NVIDIA H200", 4800.0), ("NVIDIA H200 NVL", 4800.0), ("NVIDIA H100 80GB HBM3", 3350.0),
                       ("NVIDIA H100 PCIe", None), ("NVIDIA A10G", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        got = rows.datasheet_hbm(cuda)
        assert got["hbm_datasheet_gbps"] == gbps, name
        assert (got["hbm_datasheet"] or "").startswith(name) if gbps else name in got["hbm_datasheet_reason"]
