"""benchmarks/plot.py draws from rows: synthetic rows in, PNGs out; skipped rows ignored; no rows, no plots."""

import json
import sys

import pytest

from helpers import benchmark_module


def _plot():
    return benchmark_module("plot")


ENV = dict(device="NVIDIA Test GPU", commit="abc1234", dtype="bfloat16", torch="2.13", prefix_kernels="0.1.0")


def _row(workload, mode, provider, ms, status="ok", peak=None, **shape):
    row = dict(workload=workload, mode=mode, provider=provider, shape=shape, status=status, **ENV)
    if status == "ok":
        row.update(median_ms=ms, peak_mib=peak)
    else:
        row["reason"] = "ImportError: not installed"
    return row


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _synthetic(results):
    attn = []
    for mode in ("fwd", "fwd_bwd"):
        for P in (16, 128, 1024):
            attn += [_row("attention", mode, "prefix_kernels", 1.0, B=16, P=P),
                     _row("attention", mode, "sdpa_copied", 2.0 + P / 1024, B=16, P=P),
                     _row("attention", mode, "flex_broadcast", None, status="skipped", B=16, P=P)]
    decode = [_row("decode", "fwd", prov, ms * B / 8, peak=(B * P if prov == "sdpa_expanded" else P + B), B=B, P=P)
              for B in (8, 64) for P in (1024, 4096)
              for prov, ms in (("prefix_kernels_triton", 0.1), ("prefix_kernels_cuda", 0.08), ("sdpa_expanded", 0.3))]
    train = [_row("train_step", "fwd_bwd_adamw", prov, ms, peak=peak, B=16, L=512, P=P)
             for P in (16, 64) for prov, ms, peak in (("prefix_kernels", 100.0, 9000.0), ("peft_sdpa", 130.0, 12000.0))]
    gen = [_row("generate", "sample", prov, ms, peak=peak, B=B, prompt=2048, new=256)
           for B in (16, 64) for prov, ms, peak in (("prefix_kernels_generate", 5000.0, 4000.0 + B),
                                                   ("hf_generate_sdpa", 9000.0, 4000.0 + 40 * B))]
    _write(results / "attention.jsonl", attn)
    _write(results / "decode.jsonl", decode)
    _write(results / "gpu" / "train_step.jsonl", train)  # rows in subfolders (a GPU session's $OUT) count too
    _write(results / "generate.jsonl", gen)


def _rounded(points):
    return [(x, round(y, 9)) for x, y in points]


def test_series_come_from_ok_rows_only(tmp_path):
    plot = _plot()
    _synthetic(tmp_path)
    rows = plot.load_rows(tmp_path)
    assert all(r["status"] == "ok" for r in rows)
    attn = plot.speedup_series([r for r in rows if r["workload"] == "attention"], "P")
    assert set(attn) == {"mode=fwd", "mode=fwd_bwd"}
    assert set(attn["mode=fwd"]) == {"prefix_kernels vs sdpa_copied"}  # the skipped flex rows are not drawn
    assert attn["mode=fwd"]["prefix_kernels vs sdpa_copied"] == [(16, 2.015625), (128, 2.125), (1024, 3.0)]
    dec = plot.speedup_series([r for r in rows if r["workload"] == "decode"], "P", ("B",))
    assert set(dec) == {"mode=fwd, B=8", "mode=fwd, B=64"}
    assert set(dec["mode=fwd, B=8"]) == {"prefix_kernels_triton vs sdpa_expanded", "prefix_kernels_cuda vs sdpa_expanded"}
    assert _rounded(dec["mode=fwd, B=64"]["prefix_kernels_cuda vs sdpa_expanded"]) == [(1024, 3.75), (4096, 3.75)]
    across_b = plot.speedup_series([r for r in rows if r["workload"] == "decode"], "B", ("P",))
    assert set(across_b) == {"mode=fwd, P=1024", "mode=fwd, P=4096"}
    assert _rounded(across_b["mode=fwd, P=1024"]["prefix_kernels_triton vs sdpa_expanded"]) == [(8, 3.0), (64, 3.0)]
    mem = plot.memory_series([r for r in rows if r["workload"] == "generate"])
    assert mem["hf_generate_sdpa [sample]"] == [(16, 4640.0), (64, 6560.0)]
    dec_mem = plot.memory_series([r for r in rows if r["workload"] == "decode"])
    assert dec_mem["sdpa_expanded [fwd] (P=4096)"] == [(8, 8 * 4096), (64, 64 * 4096)]


def test_plots_are_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    plot = _plot()
    _synthetic(tmp_path / "results")
    written = plot.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "plots")])
    names = sorted(p.name for p in written)
    assert len(names) == 8, names  # speedup: 4 workloads, decode twice (across P, across B); memory: 3
    for kind in ("attention_speedup", "decode_speedup_NVIDIA", "decode_speedup_by_B", "train_step_speedup",
                 "generate_speedup", "decode_memory", "train_step_memory", "generate_memory"):
        assert any(n.startswith(kind) and "NVIDIA-Test-GPU" in n and "abc1234" in n for n in names), kind
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_rows_no_plots(tmp_path, capsys):
    plot = _plot()
    _write(tmp_path / "results" / "attention.jsonl",
           [_row("attention", "fwd", "flex_broadcast", None, status="skipped", B=1, P=16)])
    assert plot.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "plots")]) == []
    assert not (tmp_path / "plots").exists()
    assert "no plots" in capsys.readouterr().out


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    plot = _plot()
    _synthetic(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(ImportError, match=r'pip install "\.\[bench\]"'):
        plot.plot_all(tmp_path, tmp_path / "plots")
    with pytest.raises(SystemExit, match="bench"):
        plot.main(["--results", str(tmp_path), "--out", str(tmp_path / "plots")])


def test_headline_sets_the_fastest_of_ours_against_the_fastest_baseline(tmp_path):
    headline = benchmark_module("headline")
    _synthetic(tmp_path)
    rows = _plot().load_rows(tmp_path)
    # the package's fraction of the copy bandwidth, on the cuda rows only (the faster of ours)
    for r in rows:
        if r["provider"] == "prefix_kernels_cuda":
            r["frac_copy_bw"] = 0.5 + r["shape"]["B"] / 1000
    table = {(e["workload"], e["mode"]): e for e in headline.headline(rows)}
    assert set(table) == {("attention", "fwd"), ("attention", "fwd_bwd"), ("decode", "fwd"),
                          ("train_step", "fwd_bwd_adamw"), ("generate", "sample")}
    dec = table["decode", "fwd"]
    assert dec["shapes"] == 4 and dec["best_baselines"] == ["sdpa_expanded"]
    assert round(dec["speedup_min"], 9) == round(dec["speedup_max"], 9) == 3.75  # 0.3 / 0.08, cuda beats triton
    assert _rounded([(dec["fraction_min"], dec["fraction_max"])]) == [(0.508, 0.564)] and dec["limit"] == "copy bandwidth"
    attn = table["attention", "fwd"]  # the skipped flex rows are no baseline
    assert attn["best_baselines"] == ["sdpa_copied"] and (attn["speedup_min"], attn["speedup_max"]) == (2.015625, 3.0)
    assert attn["fraction_min"] is None
    text = headline.markdown(headline.headline(rows))
    assert "| decode (fwd) | NVIDIA Test GPU | bfloat16 | 4 | 3.75x | sdpa_expanded | 51% – 56% of copy bandwidth | abc1234 |" in text
    assert "| attention (fwd) | NVIDIA Test GPU | bfloat16 | 3 | 2.02x – 3.00x | sdpa_copied | - | abc1234 |" in text


def test_headline_notes_skipped_providers_and_leaves_out_smoke_rows(tmp_path):
    headline = benchmark_module("headline")
    _synthetic(tmp_path)
    # a smoke run's rows (tiny shapes) beside the measured ones: never in the table
    _write(tmp_path / "smoke.jsonl", [dict(_row("attention", "fwd", "prefix_kernels", 50.0, B=16, P=16), smoke=True)])
    text = headline.markdown(headline.headline(_plot().load_rows(tmp_path, skipped=True)))
    assert "| attention (fwd) | NVIDIA Test GPU | bfloat16 | 3 | 2.02x – 3.00x |" in text
    assert "- attention (fwd), NVIDIA Test GPU: flex_broadcast skipped (ImportError: not installed)" in text


def test_headline_never_pairs_rows_of_two_commits(tmp_path):
    """Ours rerun at a new commit, the baseline left from an older one: no speedup is claimed."""
    headline = benchmark_module("headline")
    ours = dict(_row("decode", "fwd", "prefix_kernels_triton", 1.0, B=8, P=1024), commit="bbbbbbb")
    base = dict(_row("decode", "fwd", "sdpa_expanded", 2.0, B=8, P=1024), commit="aaaaaaa")
    text = headline.markdown(headline.headline([ours, base]))
    assert "2.00x" not in text and "no shape where the package and a baseline both ran" in text


def test_headline_leaves_out_opt_in_variants(tmp_path):
    """The fused decode launch is off by default: a faster fused row must not become the
    headline's speedup, which is what a user gets without asking."""
    headline = benchmark_module("headline")
    rows = [_row("decode", "fwd", "prefix_kernels_triton", 1.0, B=8, P=1024),
            _row("decode", "fwd", "prefix_kernels_triton_fused", 0.5, B=8, P=1024),
            _row("decode", "fwd", "sdpa_expanded", 2.0, B=8, P=1024)]
    text = headline.markdown(headline.headline(rows))
    assert "2.00x" in text and "4.00x" not in text


def test_a_broken_row_file_is_named(tmp_path):
    rows = benchmark_module("rows")
    path = tmp_path / "decode.jsonl"
    path.write_text(json.dumps(_row("decode", "fwd", "sdpa_expanded", 1.0, B=1, P=1)) + "\n" + '{"workload": "dec')
    with pytest.raises(ValueError, match=r"decode\.jsonl:2: not a JSON row"):
        _plot().load_rows(tmp_path)
    with pytest.raises(ValueError, match=r"decode\.jsonl:2"):
        rows.upsert(path, [])


def _shared_prompt_rows():
    """GRPO/DPO log-prob steps across G, one panel per completion length; prefix_grouper flagged at
    one shape for logits that did not match stock's."""
    rows = []
    for Lc in (128, 512):
        for G in (2, 8, 16):
            for prov, ms, peak in (("stock_sdpa", 10.0 * G, 100.0 * G), ("prefix_grouper", 6.0 * G, 60.0 * G),
                                   ("prefix_kernels", 4.0 * G, 30.0 * G)):
                row = _row("shared_prompt", "logprob_fwd_bwd", prov, ms, peak=peak, G=G, prompts=2, Lp=512, Lc=Lc)
                row["matches_stock"] = not (prov == "prefix_grouper" and G == 16 and Lc == 512)
                rows.append(row)
    return rows


def test_shared_prompt_speedup_across_g_and_memory(tmp_path):
    plot = _plot()
    rows = _shared_prompt_rows()
    series = plot.speedup_series(rows, "G", ("Lc",))
    assert list(series) == ["mode=logprob_fwd_bwd, Lc=128", "mode=logprob_fwd_bwd, Lc=512"]
    lines = series["mode=logprob_fwd_bwd, Lc=128"]
    assert lines == {"prefix_kernels vs prefix_grouper": [(2, 1.5), (8, 1.5), (16, 1.5)],
                     "prefix_kernels vs stock_sdpa": [(2, 2.5), (8, 2.5), (16, 2.5)]}
    # the flagged row is no speedup
    assert series["mode=logprob_fwd_bwd, Lc=512"]["prefix_kernels vs prefix_grouper"] == [(2, 1.5), (8, 1.5)]
    mem = plot.memory_series(rows, "G")
    assert mem["prefix_kernels [logprob_fwd_bwd] (Lc=512)"] == [(2, 60.0), (8, 240.0), (16, 480.0)]
    assert plot.memory_series(rows) == {}  # no B in these shapes: the default axis draws nothing
    headline = benchmark_module("headline")
    (entry,) = headline.headline(rows)
    assert entry["shapes"] == 6 and entry["best_baselines"] == ["prefix_grouper", "stock_sdpa"]
    assert (entry["speedup_min"], entry["speedup_max"]) == (1.5, 2.5)  # stock is the best baseline where pg is flagged
    assert "did not match stock" in entry["skipped"]["prefix_grouper"]
    pytest.importorskip("matplotlib")
    _write(tmp_path / "results" / "train_step.jsonl", rows)  # a GPU session puts them beside train_step's
    names = sorted(p.name for p in plot.plot_all(tmp_path / "results", tmp_path / "plots"))
    assert [n.split("_NVIDIA")[0] for n in names] == ["shared_prompt_memory", "shared_prompt_speedup"]
