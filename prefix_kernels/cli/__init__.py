"""`prefix-kernels` command line: demo, info, verify and bench (commands.py)."""

from .commands import main

__all__ = ["main"]
