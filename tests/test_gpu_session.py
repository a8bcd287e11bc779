"""benchmarks/gpu_session.py: one call on a GPU machine within a time budget. Its plan must fit its
limits on the files it leaves under --out, its budget must cut and skip steps rather than overrun
the call, and every step must run: checked here on the CPU (a rehearsal at smoke sizes) so that
the first GPU session does not spend its minutes on a typo."""

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from helpers import benchmark_module

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gs():
    return benchmark_module("gpu_session")


def test_plan_fits_the_limits_on_files_under_out(gs):
    files = gs.files_written()
    assert len(files) == len(set(files)) <= gs.MAX_FILES
    assert all(gs.NAME.match(f) for f in files)
    for step in (gs.BUILD, *gs.PLAN):
        assert 0 <= step.floor_s <= step.cap_s, step.name
        for argv in (step.gpu, step.rehearse):
            for a in argv:  # every script a step names exists in the checkout
                if a.endswith(".py"):
                    assert (gs.ROOT / a).is_file(), (step.name, a)
        for needed in step.needs:  # and an earlier step writes what it reads
            earlier = gs.PLAN[: gs.PLAN.index(step)]
            assert any(needed in s.writes for s in earlier), (step.name, needed)
    # the most valuable first: the GPU tests, then issue 4's decode numbers
    assert [s.name for s in gs.PLAN[:2]] == ["tests_gpu", "decode"]
    assert gs.PLAN[0].env["PREFIX_KERNELS_GPU_EXAMPLES"] == str(gs.GPU_EXAMPLES)


def test_shared_prompt_rows_share_a_file_within_the_limit(gs):
    """The shared-prompt step writes its rows beside train_step's (a row's identity includes its
    workload): a ninth file would not come back from the GPU machine."""
    step = gs.STEPS["shared_prompt"]
    assert "benchmarks/bench_shared_prompt.py" in step.gpu and "--smoke" in step.rehearse
    assert step.writes == gs.STEPS["train_step"].writes == ("train_step.jsonl",)
    out = gs.argv_for(step, Path("/o"), rehearse=False)
    assert out[out.index("--out") + 1] == "/o/train_step.jsonl"
    assert gs.files_written().count("train_step.jsonl") == 1 and len(gs.files_written()) <= gs.MAX_FILES
    names = [s.name for s in gs.PLAN]
    assert names.index("train_step") < names.index("shared_prompt") < names.index("headline")


def test_out_folder_problems_name_what_exceeds_the_limits(gs, tmp_path):
    assert gs.out_folder_problems(tmp_path) == []
    for i in range(gs.MAX_FILES):
        (tmp_path / f"f{i}.jsonl").write_text("{}\n")
    assert gs.out_folder_problems(tmp_path) == []
    (tmp_path / "one too many.log").write_text("")
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "x.json").write_text("")
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(gs.MAX_FILE_BYTES + 1)  # sparse: nothing is written
    problems = "\n".join(gs.out_folder_problems(tmp_path))
    assert "one too many.log: a name" in problems
    assert "a/b/c/x.json: deeper than 2 folders" in problems
    assert "big.bin: larger than 16 MiB" in problems
    assert f"11 files, more than {gs.MAX_FILES}" in problems



def test_file_limits_are_arguments(gs, tmp_path, monkeypatch, capsys):
    """--max-files and --max-file-mib set the limits out_folder_problems checks (defaults 8 and 16)."""
    for i in range(3):
        (tmp_path / f"f{i}.jsonl").write_bytes(b"x" * 3000)
    assert gs.out_folder_problems(tmp_path) == []
    problems = "\n".join(gs.out_folder_problems(tmp_path, max_files=2, max_file_bytes=2048))
    assert "3 files, more than 2" in problems and "f0.jsonl: larger than" in problems
    seen = {}
    monkeypatch.setattr(gs, "session", lambda args: seen.setdefault("args", args) and dict(left_to_do=[], out_problems=[]))
    assert gs.main(["--rehearse", "--out", str(tmp_path), "--max-files", "3", "--max-file-mib", "0.5"]) == 0
    assert (seen["args"].max_files, seen["args"].max_file_mib) == (3, 0.5)
    seen.clear()
    gs.main(["--rehearse", "--out", str(tmp_path)])
    assert (seen["args"].max_files, seen["args"].max_file_mib) == (gs.MAX_FILES, gs.MAX_FILE_MIB) == (8, 16)
    for bad in (["--max-files", "0"], ["--max-file-mib", "-1"]):
        with pytest.raises(SystemExit):
            gs.main(["--rehearse", *bad])
    assert "--max-file-mib must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gs.main(["--help"])
    assert "the OUT environment variable, or benchmarks/results/gpu" in " ".join(capsys.readouterr().out.split())

def _fake(gs, name, code, cap, floor=0, writes=(), needs=()):
    argv = (sys.executable, "-c", code)
    return gs.Step(name, gpu=argv, cap_s=cap, floor_s=floor, writes=writes, needs=needs)


def test_budget_cuts_a_step_at_its_cap_and_skips_what_no_longer_fits(gs, tmp_path, monkeypatch, capsys):
    write_rows = "import os; open(os.path.join({out!r}, 'rows.jsonl'), 'w').write('{{}}\\n'); print('rows written')"
    plan = (
        _fake(gs, "first", write_rows.format(out=str(tmp_path)), cap=60, writes=("rows.jsonl",)),
        # a step that would run for a minute: interrupted at its 2 s cap, its output kept
        _fake(gs, "slow", "import time; print('measuring', flush=True); time.sleep(60)", cap=2),
        _fake(gs, "reads_rows", "print('read')", cap=30, needs=("rows.jsonl",)),
        _fake(gs, "reads_nothing_written", "print('x')", cap=30, needs=("absent.jsonl",)),
        _fake(gs, "too_big_for_what_is_left", "print('never')", cap=60, floor=50),
        _fake(gs, "fails", "raise SystemExit(3)", cap=30),
    )
    monkeypatch.setattr(gs, "PLAN", plan)
    monkeypatch.setattr(gs, "STEPS", {s.name: s for s in (gs.BUILD, *plan)})
    args = Namespace(out=tmp_path, budget=40, steps=[s.name for s in plan], rehearse=True,
                     max_files=gs.MAX_FILES, max_file_mib=gs.MAX_FILE_MIB)
    summary = gs.session(args)
    status = {r["step"]: r["status"] for r in summary["steps"]}
    assert status == dict(first="ok", slow="cut", reads_rows="ok", reads_nothing_written="skipped",
                          too_big_for_what_is_left="skipped", fails="failed")
    steps = {r["step"]: r for r in summary["steps"]}
    assert steps["slow"]["tail"][0] == "measuring" and steps["slow"]["tail"][-1] == "KeyboardInterrupt"  # SIGINT first
    assert steps["slow"]["seconds"] < 20
    assert "needs absent.jsonl" in steps["reads_nothing_written"]["reason"]
    assert "budget:" in steps["too_big_for_what_is_left"]["reason"]
    assert steps["fails"]["returncode"] == 3
    assert summary["left_to_do"] == ["slow", "reads_nothing_written", "too_big_for_what_is_left", "fails"]
    assert "--steps slow,reads_nothing_written,too_big_for_what_is_left,fails" in summary["rerun"]
    saved = json.loads((tmp_path / "session.json").read_text())
    assert saved["left_to_do"] == summary["left_to_do"] and saved["budget_s"] == 40
    log = (tmp_path / "session.log").read_text()
    assert "rows written" in log and "measuring" in log and "read" in log
    printed = capsys.readouterr().out
    assert "left to do: slow, reads_nothing_written" in printed


def test_rerun_takes_along_the_steps_whose_files_a_left_step_reads(gs, tmp_path, monkeypatch):
    """A second call may write into a fresh --out: decode_choice left to do needs decode rerun with it
    (the printed command once named decode_choice alone, which could never run)."""
    write_rows = "import os; open(os.path.join({out!r}, 'rows.jsonl'), 'w').write('{{}}\\n')"
    plan = (_fake(gs, "first", write_rows.format(out=str(tmp_path)), cap=30, writes=("rows.jsonl",)),
            _fake(gs, "other", "print('ok')", cap=30),
            _fake(gs, "reads_rows", "raise SystemExit(1)", cap=30, needs=("rows.jsonl",)))
    monkeypatch.setattr(gs, "PLAN", plan)
    monkeypatch.setattr(gs, "STEPS", {s.name: s for s in (gs.BUILD, *plan)})
    summary = gs.session(Namespace(out=tmp_path, budget=60, steps=[s.name for s in plan], rehearse=True,
                                   max_files=gs.MAX_FILES, max_file_mib=gs.MAX_FILE_MIB))
    assert summary["left_to_do"] == ["first", "reads_rows"]
    assert "--steps first,reads_rows " in summary["rerun"]


def test_rehearsal_runs_the_real_steps_on_the_cpu(gs, tmp_path):
    """The real driver in a child process: the CUDA build stand-in, the GPU test selection
    (collected, so a bad marker or -k expression fails here), and a real benchmark at smoke size."""
    done = subprocess.run([sys.executable, str(BENCH / "gpu_session.py"), "--rehearse", "--out", str(tmp_path),
                           "--budget", "600", "--steps", "build,tests_gpu,tests_compiled,train_step,shared_prompt"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "session.json").read_text())
    assert [r["step"] for r in summary["steps"]] == ["build", "tests_gpu", "train_step", "shared_prompt",
                                                    "tests_compiled"]  # plan order
    assert all(r["status"] == "ok" for r in summary["steps"]), summary["steps"]
    tails = {r["step"]: "\n".join(r["tail"]) for r in summary["steps"]}
    assert " tests collected" in tails["tests_gpu"] and " tests collected" in tails["tests_compiled"]
    rows = [json.loads(line) for line in (tmp_path / "train_step.jsonl").read_text().splitlines()]
    assert {r["workload"] for r in rows} == {"train_step", "shared_prompt"}  # both steps' rows, one file
    assert all(r["status"] == "ok" for r in rows if r["provider"] != "prefix_grouper")
    assert summary["out_problems"] == [] and summary["left_to_do"] == [] and summary["rerun"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["session.json", "session.log", "train_step.jsonl"]


def test_gpu_examples_reads_the_environment(monkeypatch):
    from helpers import GPU_EXAMPLES_ENV, gpu_examples

    monkeypatch.delenv(GPU_EXAMPLES_ENV, raising=False)
    assert gpu_examples(150) == 150
    monkeypatch.setenv(GPU_EXAMPLES_ENV, "25")
    assert gpu_examples(150) == 25
    for bad in ("0", "-3", "many"):
        monkeypatch.setenv(GPU_EXAMPLES_ENV, bad)
        with pytest.raises(ValueError, match=GPU_EXAMPLES_ENV):
            gpu_examples(150)


def test_refuses_to_run_without_a_gpu_unless_rehearsing(gs, monkeypatch, capsys):
    monkeypatch.setattr(gs.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as e:
        gs.main(["--budget", "10"])
    assert e.value.code == 2 and "--rehearse" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gs.main(["--steps", "tests_gpu,nonsense", "--rehearse"])
    assert "unknown nonsense" in capsys.readouterr().err


def _wheel(folder: Path, name: str, version: str, module_code: str) -> Path:
    """A minimal pure-Python wheel (a zip with the module and its dist-info), as pip downloads them."""
    import zipfile

    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}.py": module_code,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_carried_wheels_and_aot_modules_are_installed_where_the_steps_find_them(gs, tmp_path, monkeypatch):
    root, site = tmp_path / "repo", tmp_path / "site"
    (root / ".whl" / "aot").mkdir(parents=True)
    _wheel(root / ".whl", "carried_pkg", "1.0", "VALUE = 42\n")
    (root / ".whl" / "aot" / "batch_prefill_bf16.so").write_bytes(b"\x7fELF stand-in")
    monkeypatch.setattr(gs, "ROOT", root)
    monkeypatch.setattr(gs, "WHEEL_SITE", site)
    env = {"PYTHONPATH": "/already/there"}
    record = gs.install_wheels(env, print)
    assert record["status"] == "ok", record["tail"]
    assert env["PYTHONPATH"] == f"/already/there:{site}"
    assert (site / "flashinfer" / "data" / "aot" / "batch_prefill_bf16" / "batch_prefill_bf16.so").is_file()
    got = subprocess.run([sys.executable, "-c", "import carried_pkg; print(carried_pkg.VALUE)"],
                         env=dict(env, PATH="/usr/bin:/bin"), capture_output=True, text=True)
    assert got.stdout.strip() == "42", got.stderr
    (root / ".whl" / "carried_pkg-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    env = {}
    assert gs.install_wheels(env, print)["status"] == "failed" and "PYTHONPATH" not in env
    monkeypatch.setattr(gs, "ROOT", tmp_path / "nothing")
    assert gs.install_wheels({}, print) is None  # no .whl: nothing to do, no step recorded
