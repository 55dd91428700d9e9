"""`python -m hf_flash --help`, and the one-line error for TRITON_INTERPRET set after importing hf_flash."""

import os
import runpy
import subprocess
import sys

import pytest


def test_python_m_hf_flash_help(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["hf_flash", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("hf_flash", run_name="__main__")
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith("usage: python -m hf_flash")
    assert "which attention path hf_flash takes" in out and "CPU tensors" not in out  # help, not the report


def test_triton_interpret_set_after_import_is_one_clear_line():
    code = (
        "import os, torch, hf_flash\n"
        "os.environ['TRITON_INTERPRET'] = '1'  # too late: the kernels were built for a GPU\n"
        "q = torch.randn(1, 16, 2, 16, dtype=torch.float16)\n"
        "hf_flash.flash_attn_func(q, q, q)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr
    assert last.startswith("RuntimeError: TRITON_INTERPRET=1 was set after hf_flash"), proc.stderr
    assert "active drivers" not in proc.stderr


def test_triton_start_up_is_warmed_in_the_background(monkeypatch):
    """Where kernels compile (a GPU, no interpreter) import starts a thread that caches Triton's process key."""
    import torch
    from triton.runtime.cache import triton_key

    from hf_flash.ops import startup

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert startup.start() is None, "the interpreter compiles nothing: no thread"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert startup.start() is None, "no GPU: no thread"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    triton_key.cache_clear()
    thread = startup.start()
    assert thread is not None and thread.daemon
    thread.join(timeout=60)
    assert triton_key.cache_info().currsize == 1, "the key is cached for the first kernel load"
