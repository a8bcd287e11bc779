"""Only @triton.jit code lives here; launchers are one level up."""
