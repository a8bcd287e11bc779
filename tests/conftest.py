"""Shared pytest configuration for the prefix_kernels test suite.

The very first thing this file does is decide whether Triton runs in
interpreter mode.  Triton reads ``TRITON_INTERPRET`` when a kernel is
*decorated* with ``@triton.jit`` (i.e. when ``prefix_kernels`` is imported),
not when it is launched, so the variable has to be set before anything imports
``prefix_kernels`` or ``triton``.  ``import torch`` does not import triton.
``torch.cuda.is_available()`` only asks the driver for a device count; it does
not create a CUDA context.
"""

import os
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    # No GPU: run Triton kernels through the CPU interpreter on CPU tensors.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

# Make ``from helpers import ...`` work even without the ``pythonpath`` ini
# option (the project config also sets ``pythonpath = ["tests"]``).
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA device; skipped when torch.cuda.is_available() is False"
    )


def pytest_runtest_setup(item):
    # Evaluated at run time for each test, never at import/collection time.
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield
    # A test may have changed what a backend can take (a monkeypatched probe, a fake backend):
    # the registry's remembered choices must not outlive it.
    registry = sys.modules.get("prefix_kernels.backends.registry")
    if registry is not None:
        registry.forget_plans()


def triton_interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter, read as Triton reads it (the package's
    one parser; imported here, at test time, after the variable is set above)."""
    from prefix_kernels._core.env import triton_interpret_requested

    return triton_interpret_requested()


@pytest.fixture
def triton_device():
    """Device on which the small "triton" lane runs.

    Under the interpreter (the default on a machine without a GPU) Triton
    kernels run on CPU tensors.  On a GPU machine without the interpreter the
    same small lane runs on the GPU.
    """
    if triton_interpreting():
        from prefix_kernels.backends.triton import installed_interpreter_clash as _installed_interpreter_clash

        clash = _installed_interpreter_clash()
        if clash is not None:
            pytest.skip(clash)
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("triton backend needs TRITON_INTERPRET=1 or a CUDA device")
