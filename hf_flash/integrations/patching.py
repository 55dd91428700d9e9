"""Wrapping a Transformers function in place, once per process.

The integration wraps three of Transformers' functions (the flash loader, the flash-name redirect, the end of
every model's ``__init__``). Each wrap must happen once however often ``register`` runs or the module is
reloaded, so the wrapper is marked and a second wrap finds the mark and leaves it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

__all__ = ["wrap_once"]

_MARK = "_hf_flash_wrapper"


def wrap_once(owner, name: str, make_wrapper: Callable[[Callable], Callable]) -> bool:
    """Replace ``owner.<name>`` (a module's function, or a method a class defines itself, not one it inherits)
    by ``make_wrapper(original)``, with the original's name and docstring, unless it is already our wrapper.
    ``make_wrapper`` runs only when the wrap happens. Returns False where ``owner`` has no such attribute."""
    original = vars(owner).get(name)
    if original is None:
        return False
    if not getattr(original, _MARK, False):
        wrapper = functools.wraps(original)(make_wrapper(original))
        setattr(wrapper, _MARK, True)
        setattr(owner, name, wrapper)
    return True
