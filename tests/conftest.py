"""Shared test setup.

Without a CUDA GPU the Triton kernels run under Triton's interpreter on CPU tensors. The interpreter
is chosen when a kernel is decorated, so ``TRITON_INTERPRET`` is set here, before anything imports
``hf_flash``.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def fresh_fallback_warnings(monkeypatch):
    """Fallbacks warn (not raise) and each reason is reported again, in this test only."""
    from hf_flash import fallback

    monkeypatch.delenv("HF_FLASH_STRICT", raising=False)
    fallback.reset_warnings()
    yield
    fallback.reset_warnings()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_close_rel(name, ours, ref_fp32, torch_same_dtype, factor, eps=1e-5):
    """flash-attn's rule: our error against the fp32 reference is at most ``factor`` times the error
    of PyTorch's own computation in the same low-precision dtype, plus a small absolute eps."""
    err = max_err(ours, ref_fp32)
    base = max_err(torch_same_dtype, ref_fp32)
    assert torch.isfinite(ours.float()).all(), f"{name}: non-finite values"
    assert err <= factor * base + eps, f"{name}: max err {err:.3e} > {factor} x torch err {base:.3e} + {eps}"


@pytest.fixture
def fake_gpu(monkeypatch):
    """``fake_gpu(capability, smem, name)`` makes config.py, dispatch.py and info.py see one CUDA GPU of
    that kind; returns its device."""
    from types import SimpleNamespace

    from hf_flash.ops import config

    monkeypatch.setattr(config, "_forced", None)

    def install(capability, smem=None, name="Fake GPU"):
        smem = smem if smem is not None else config.default_smem_per_block(capability)
        props = SimpleNamespace(name=name, major=capability[0], minor=capability[1],
                                shared_memory_per_block_optin=smem)
        monkeypatch.setattr(config, "_device_facts", lambda index: (tuple(capability), smem, name))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: tuple(capability))
        return torch.device("cuda", 0)

    return install
