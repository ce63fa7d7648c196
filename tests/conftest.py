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


# The files that take longest on 2 CPU cores (pytest --durations, 2026-12-07), longest first:
# collected first, so that under `--dist loadfile` none of them starts last and runs alone while
# the other worker idles. Files keep their own test order; the rest follow in collection order.
SLOW_FILES = (
    "test_engine_prefill.py", "test_serve.py", "test_families.py", "test_cache_insertion.py",
    "test_fp8_native.py", "test_engine_lockstep.py", "test_serve_restart.py",
    "test_source_styles.py", "test_fp8_graph.py", "test_backend.py", "test_cli.py",
    "test_lower.py", "test_rank_passes.py", "test_structure.py", "test_build_cache.py",
    "test_parity_ranks.py", "test_run_in_process.py", "test_http_hardening.py", "test_stamp.py",
    "test_qwen3_32b.py", "test_fp8_kv_cache.py", "test_runtime.py",
)


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: order.get(item.path.name, len(SLOW_FILES)))
