"""Test session setup shared by every test module."""

import os

import torch

# Triton kernels run on CPU tensors only through the interpreter, and Triton reads this flag
# when a kernel module is first imported: set it before anything imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
