"""Per-rank runtime: Triton kernels, lowering, KV cache, weights, engine, front end."""

import os

import torch

# Without a GPU, Triton kernels run only through its interpreter, and Triton decides that when
# each @triton.jit function is defined — including Triton's own helpers that other imports
# (torch._inductor) may define first. Choose it when the runtime is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
