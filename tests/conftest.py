"""Test session setup shared by every test module."""

import os

import torch

# Triton kernels run on CPU tensors only through the interpreter, and Triton reads this flag
# when a kernel module is first imported: set it before anything imports the kernels. The one
# place the tests set it: pytest imports this file before any test module. (With a GPU the
# kernels must compile: the interpreter cannot take CUDA tensors.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The jobs the tests launch are the CPU parity jobs (gloo ranks): on a GPU machine too, where
# ranks would otherwise take one GPU each (adp --device; docs/cli.md).
os.environ.setdefault("ADP_DEVICE", "cpu")

# adp run keeps built ranks in the user's cache dir; the tests keep theirs in one fresh
# directory per session (never the user's), shared by the tests, whose jobs may hit it.
import tempfile  # noqa: E402

os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="adp-test-cache-")

