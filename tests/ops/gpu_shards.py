"""pytest plugin for the GPU run (``-p gpu_shards`` with tests/ops on PYTHONPATH; see run_gpu_tests.sh):
``HF_FLASH_TEST_SHARD=i/n`` keeps every n-th selected test starting at i, so n pytest processes on one GPU
compile their Triton specialisations in parallel. (A plugin, not a conftest.py: a second conftest module
would shadow the root one that the tests import ``assert_close_rel`` from.)"""

import os

import pytest


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected, so the shards stay balanced
def pytest_collection_modifyitems(config, items):
    shard = os.environ.get("HF_FLASH_TEST_SHARD")
    if not shard:
        return
    index, count = (int(x) for x in shard.split("/"))
    if not 0 <= index < count:
        raise pytest.UsageError(f"HF_FLASH_TEST_SHARD must be i/n with 0 <= i < n, got {shard!r}")
    kept = [item for i, item in enumerate(items) if i % count == index]
    config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i % count != index])
    items[:] = kept
