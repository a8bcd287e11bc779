"""Log a message once per process on the "prefix_kernels" logger."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("prefix_kernels")

_logged: set = set()


def log_once(message: str, level: int = logging.WARNING) -> None:
    """Log `message` the first time it is seen in this process; later calls are silent."""
    if torch.compiler.is_compiling():
        return  # dynamo cannot trace logging; the eager calls log it
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


def forget_logged() -> None:
    """Let every message be logged again (tests that look for a once-only message)."""
    _logged.clear()
