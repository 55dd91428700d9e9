"""LoRA fine-tuning and backend comparison (``scripts/finetune_lora.py``, ``scripts/compare_backends.py``).

These modules need the ``[train]`` extra (peft, datasets, accelerate, tqdm, matplotlib), which the kernels
and the Transformers integration do not: ``import hf_flash`` works without it. A module that needs a
package of the extra checks for it when imported and raises :class:`MissingExtra`, whose one-line message
says what to install; the scripts print that line.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

INSTALL_HINT = "pip install 'hf_flash[train]'"


class MissingExtra(ImportError):
    """A package of the ``[train]`` extra is not installed."""


def require(*packages: str) -> None:
    """Raise :class:`MissingExtra` naming the packages (of the ``[train]`` extra) that are not installed.

    Looks for them without importing them (``importlib.util.find_spec``), so the check costs nothing."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise MissingExtra(f"{', '.join(missing)} {verb} not installed; hf_flash's training needs the [train] "
                           f"extra: {INSTALL_HINT}", name=missing[0])  # fmt: skip


def output_dir_problem(output_dir) -> str | None:
    """Why ``output_dir`` cannot hold a run's outputs (it, or a folder above it, is a file), or None.
    The scripts check it before loading anything: otherwise it fails only when the first file is written."""
    path = Path(output_dir).expanduser()
    blocker = next((p for p in (path, *path.parents) if p.is_file()), None)
    if blocker is None:
        return None
    where = "is a file" if blocker == path else f"is inside {blocker}, which is a file"
    return f"--output-dir {output_dir} {where}; pass a folder (it is created if missing)"
