"""README.md and docs/*.md: every ```python block runs, the README stays one screen, and the docs
speak of the project only.

Each page's ```python blocks run in order, in one fresh namespace per page (a later block may use
what an earlier one of the same page defined, as a reader going down the page would), in this
process and on the CPU: tiny shapes, tiny models built from configs with random weights (nothing is
downloaded). A block whose first line is a marker comment runs differently:

    # doc-test: skip (<reason>)   not run (it is still parsed); the reason is required
    # doc-test: cuda              run only where a CUDA device is present

Examples use the public API only (`prefix_kernels.<name>` for the names below and
`prefix_kernels.hf.PrefixCache`): internal modules move, the public names do not.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^#\s*doc-test:\s*(?P<what>skip|cuda)\b\s*(?P<rest>.*)$")
PUBLIC = {"shared_prefix_attention", "shared_prefix_decode", "apply_prefix_kernels", "revert_prefix_kernels",
          "completion_logits",
          "generate", "NoBackendError", "hf", "__version__"}
PUBLIC_HF = {"PrefixCache"}
# Sandbox words: the project's docs describe the project, not the machines it was developed on.
FORBIDDEN = [re.compile(r"\blent\b", re.I), re.compile(r"device budget", re.I), re.compile(re.escape("$OUT")),
             re.compile(r"device tool", re.I)]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_blocks(path: Path, lang: str = "python") -> list[tuple[int, str]]:
    """(line of the block's first code line, code) for each fenced block of `lang` in the page."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None or not m["lang"]:
            i += 1
            continue
        indent, start, body = len(m["indent"]), i + 1, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{rel(path)}:{start}: a ``` block that is never closed")
        i += 1
        if m["lang"] == lang:
            blocks.append((start + 1, "\n".join(body) + "\n"))
    return blocks


def marker(code: str) -> tuple[str | None, str]:
    first = code.lstrip("\n").splitlines()[0] if code.strip() else ""
    m = MARKER.match(first.strip())
    return (m["what"], m["rest"].strip()) if m else (None, "")


def public_api_problems(code: str) -> list[str]:
    """Uses of prefix_kernels beyond the public API: internal module paths are being moved."""
    problems = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            problems += [a.name for a in node.names
                         if a.name.startswith("prefix_kernels.") and a.name != "prefix_kernels.hf"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prefix_kernels"):
            allowed = {"prefix_kernels": PUBLIC, "prefix_kernels.hf": PUBLIC_HF}.get(node.module, set())
            problems += [f"from {node.module} import {a.name}" for a in node.names if a.name not in allowed]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "prefix_kernels":
            if node.attr not in PUBLIC:
                problems.append(f"prefix_kernels.{node.attr}")
    return problems


def test_readme_is_one_screen():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_docs_speak_of_the_project_only(page):
    found = [f"{rel(page)}:{n}: {pattern.pattern!r} in {line.strip()!r}"
             for n, line in enumerate(page.read_text().splitlines(), 1)
             for pattern in FORBIDDEN if pattern.search(line)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page):
    text = page.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{rel(page)} links to missing files: {missing}"


# Paths the docs name that a checkout need not hold: made by a wheel build or by a run.
NOT_IN_A_CHECKOUT = {"prefix_kernels/_csrc", "benchmarks/results/smoke/", "benchmarks/results/gpu"}


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_named_repository_paths_exist(page):
    """A file or folder named in `backticks` exists: modules and tests move, and a page naming
    the old place would send a reader nowhere."""
    missing = []
    for quoted in re.findall(r"`([^`\n]+)`", page.read_text()):
        path = quoted.split()[0] if quoted.split() else ""
        if (re.match(r"^(\.ci|tests|benchmarks|csrc|prefix_kernels|docs)/", path) and "<" not in path
                and path not in NOT_IN_A_CHECKOUT and not (ROOT / path).exists()):
            missing.append(path)
    assert not missing, f"{rel(page)} names paths that do not exist: {sorted(set(missing))}"


def test_readme_links_every_docs_page():
    text = README.read_text()
    unlinked = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in text]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_examples_parse_use_the_public_api_and_say_why_they_skip():
    problems = []
    for page in PAGES:
        for line, code in code_blocks(page):
            where = f"{rel(page)}:{line}"
            try:
                ast.parse(code)
            except SyntaxError as exc:
                problems.append(f"{where}: {exc}")
                continue
            what, rest = marker(code)
            if what == "skip" and not re.fullmatch(r"\(.+\)", rest):
                problems.append(f"{where}: '# doc-test: skip' needs a reason in parentheses")
            if what != "skip":
                problems += [f"{where}: {p} is not public API" for p in public_api_problems(code)]
    assert not problems, "\n".join(problems)
    assert code_blocks(README), "README.md has no python example"


def _needs_hf(code: str) -> bool:
    return bool(re.search(r"^\s*(from|import) (transformers|peft)\b", code, re.M))


@pytest.mark.parametrize("page", [p for p in PAGES if code_blocks(p)], ids=rel)
def test_examples_run(page):
    """The page's python blocks, in order, in one fresh namespace (CPU; see the module docstring)."""
    blocks = code_blocks(page)
    if any(_needs_hf(code) for _, code in blocks):
        pytest.importorskip("transformers")
        pytest.importorskip("peft")
    namespace = {"__name__": f"doc_example_{page.stem.replace('-', '_')}"}
    ran = 0
    try:
        for line, code in blocks:
            what, _ = marker(code)
            if what == "skip" or (what == "cuda" and not torch.cuda.is_available()):
                continue
            try:
                exec(compile(code, f"{rel(page)}:{line}", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"the example at {rel(page)}:{line} failed: {type(exc).__name__}: {exc}") from exc
            ran += 1
    finally:
        if "transformers" in __import__("sys").modules:
            import prefix_kernels

            prefix_kernels.revert_prefix_kernels()  # no page leaves models or PEFT patched for the next
    if ran == 0:
        pytest.skip("every example on this page needs CUDA or is marked to skip")
