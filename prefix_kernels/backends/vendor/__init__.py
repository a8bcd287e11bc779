"""Vendor attention kernels, and the two-part composition that runs a shared-prefix call on them.

Not a backend: the code two backends share. `compose.py` splits a call into its prefix part
(one non-causal call per prefix, whose "batch" is the requests using it folded into the query
length) and its own part (one causal call over each request's own keys), merges them by their
natural-log log-sum-exps, and, backwards, calls each part's own backward with the merged output
and log-sum-exp, which gives the exact gradients of the combined softmax. `kernels.py` wraps the
attention kernels it runs on (ATen's CPU flash kernel; on CUDA the flash_attn package, ATen's
flash and memory-efficient kernels), each saying why it cannot take a part.

Users: the "composed" backend (every device) and the torch backend's CPU path (torch_split).
"""
