"""Triton backend: kernels in kernels/, launchers (checks, grids, allocation) beside them.

Import of this package must not touch the GPU; `import triton` itself is deferred to the
launcher module so that the package imports where Triton is missing.
"""
