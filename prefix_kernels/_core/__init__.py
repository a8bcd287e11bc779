"""What every layer of the package shares, importing nothing from the package itself: the problem
a call describes and its checks (problem.py), memory layouts (layout.py), requests grouped by
prefix (grouping.py), the PREFIX_KERNELS_* variables and interpreter detection (env.py),
log-once (log.py), the visibility rule of own keys (masks.py), tuning switches set from
measurements (config.py) and the accuracy rule (accuracy.py)."""
