"""pytest configuration for `pytest benchmarks --benchmark-only` (pytest-benchmark): the benchmark
modules import each other's providers by name, so this folder goes on sys.path."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
