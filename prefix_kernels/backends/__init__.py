"""Backends: one folder each (triton, cpu_kernel, torch_split, cuda, reference), each declaring
beside its code what it supports (base.Backend), and the registry that chooses among them."""
