"""Every example runs on the embedded default, with the hf_flash kernels (strict: no silent fallback)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("[0-9][0-9]_*.py"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_flash_cache")  # the tiny checkpoint is written once per session


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(example, cache, tmp_path):
    env = {**os.environ, "HF_FLASH_STRICT": "1", "HF_FLASH_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(example)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.strip(), "an example prints what it showed"


def test_there_are_four_examples():
    assert len(EXAMPLES) == 4
