"""`pip install hf_flash` without the [train] extra: the kernels and the integration import, and the
training entry points say in one line what to install. Each case runs in a fresh interpreter in which
the extra's packages cannot be imported (``sys.modules[name] = None``: ``import`` fails and
``importlib.util.find_spec`` answers None, as when the package is not installed)."""

import subprocess
import sys

import pytest
from conftest import ROOT, SCRIPTS

TRAIN_EXTRA = ("peft", "datasets", "accelerate", "matplotlib")
HINT = "pip install 'hf_flash[train]'"


def _python(code: str, blocked=TRAIN_EXTRA) -> subprocess.CompletedProcess:
    prelude = f"import sys\nfor name in {tuple(blocked)!r}:\n    sys.modules[name] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip


def test_import_hf_flash_needs_none_of_the_train_extra():
    proc = _python(
        "import runpy\n"
        "import hf_flash, hf_flash.integrations\n"
        "from transformers import AttentionInterface\n"
        "assert 'hf_flash' in AttentionInterface._global_mapping\n"
        "sys.argv = ['hf_flash']\n"
        "runpy.run_module('hf_flash', run_name='__main__')  # python -m hf_flash\n"
        f"print('loaded:', [name for name in {TRAIN_EXTRA!r} if sys.modules.get(name) is not None])\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded: []" in proc.stdout and "hf_flash" in proc.stdout


def test_importing_hf_flash_leaves_the_train_extra_unimported():
    proc = _python(f"import hf_flash\nprint(sorted(set({TRAIN_EXTRA!r}) & set(sys.modules)))\n", blocked=())
    assert proc.returncode == 0, proc.stderr[-3000:]
    # accelerate may be imported by Transformers itself when it is installed; the others never are
    assert proc.stdout.strip() in ("[]", "['accelerate']")


@pytest.mark.parametrize("script, argv, blocked, package", [
    ("finetune_lora.py", ["--max-steps", "1"], ("peft",), "peft"),
    ("finetune_lora.py", ["--max-steps", "1"], ("accelerate",), "accelerate"),
    ("compare_backends.py", ["--max-steps", "1"], ("matplotlib",), "matplotlib"),
])  # fmt: skip
def test_entry_points_print_the_install_line(script, argv, blocked, package):
    path = SCRIPTS / script
    proc = _python(f"import runpy\nsys.argv = [{str(path)!r}, *{argv!r}]\nrunpy.run_path({str(path)!r}, run_name='__main__')\n",
                   blocked=blocked)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: {package} is not installed") and lines[0].endswith(HINT)


def test_the_training_module_names_the_extra():
    proc = _python("import hf_flash.training.loop\n", blocked=("peft",))
    assert proc.returncode == 1 and "MissingExtra: peft is not installed" in proc.stderr and HINT in proc.stderr
