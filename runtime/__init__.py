"""Per-rank runtime: Triton kernels, lowering, KV cache, weights, engine, front end.

Importing ``adp_pass`` (this package's parent) picks Triton's interpreter on machines without
a GPU, before Triton is first imported.
"""
