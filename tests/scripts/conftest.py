"""Fixtures for the script tests: the two scripts loaded as modules, and small CPU run settings."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The GPU machine may lack `datasets` (and pandas): tests that read data files skip there.
needs_datasets = pytest.mark.skipif(
    importlib.util.find_spec("datasets") is None or importlib.util.find_spec("pandas") is None,
    reason="needs the datasets and pandas packages",
)

# Tiny and quick on 2 CPU cores: the embedded model, 64-token rows, sdpa.
TINY = ["--attn", "sdpa", "--seq-len", "64", "--batch-size", "2", "--max-docs", "60", "--device", "cpu"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def finetune_script():
    return _load("finetune_lora")


@pytest.fixture(scope="session")
def compare_script():
    return _load("compare_backends")


@pytest.fixture
def run_finetune(finetune_script, tmp_path, capsys):
    """Call finetune_lora.main in-process; returns (exit code, stdout, stderr, output dir)."""

    def run(*argv, out=None):
        out = out or tmp_path / "run"
        code = finetune_script.main([*TINY, "--output-dir", str(out), *argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err, out

    return run
