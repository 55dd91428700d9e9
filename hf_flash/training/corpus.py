"""The default training text: docstrings of Python's standard library, gathered at run time.

Every machine with Python has them, so the default dataset needs no download and ships no
third-party text. The module list is fixed and walked in sorted order, so one interpreter always
yields the same documents in the same order (another Python version may yield slightly different
text, which is why comparisons are made within one run).
"""

from __future__ import annotations

import importlib
import inspect
import warnings

# Pure-Python modules with substantial, prose-like docstrings and no import-time side effects.
STDLIB_MODULES = (
    "builtins", "math", "cmath", "time", "array", "struct", "zlib", "io", "codecs", "abc",
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum",
    "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "heapq", "hmac", "html",
    "http.client", "http.server", "imaplib", "inspect", "ipaddress", "itertools", "json", "logging",
    "mailbox", "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil", "smtplib", "socket",
    "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "typing", "unittest", "urllib.parse", "urllib.request",
    "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile", "asyncio.base_events", "asyncio.events",
    "asyncio.streams", "asyncio.tasks", "cmd", "code", "codeop", "collections.abc", "concurrent.futures",
    "doctest", "email.message", "email.utils", "graphlib", "hashlib", "http.cookiejar", "importlib.abc",
    "locale", "logging.handlers", "mimetypes", "multiprocessing.pool", "pdb", "plistlib", "poplib", "pydoc",
    "reprlib", "selectors", "signal", "ssl", "sysconfig", "unittest.case", "unittest.mock", "wave",
    "xml.etree.ElementTree",
)  # fmt: skip

MIN_CHARS = 120  # one-line docstrings teach a language model little and bloat the document count


def _documented_objects(module):
    """(qualified name, object) pairs for the module, its public classes/functions and their methods."""
    yield module.__name__, module
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue  # skip re-exports so each docstring appears once
        if inspect.isclass(obj):
            yield f"{module.__name__}.{name}", obj
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and (inspect.isroutine(member) or isinstance(member, property)):
                    yield f"{module.__name__}.{name}.{attr}", member
        elif inspect.isroutine(obj):
            yield f"{module.__name__}.{name}", obj


def stdlib_documents(max_docs: int | None = None) -> list[dict[str, str]]:
    """Return ``[{"text": ...}, ...]``: one document per docstring of at least MIN_CHARS characters.

    The text starts with the object's dotted name, then its cleaned docstring. About 2 MB of text on
    CPython 3.11; ``max_docs`` keeps only the first documents (tests use it to stay fast).
    """
    docs: list[dict[str, str]] = []
    seen: set[str] = set()
    for module_name in STDLIB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a trimmed Python build (e.g. without sqlite3) still gives the rest
            continue
        for qualname, obj in _documented_objects(module):
            with warnings.catch_warnings():  # reading deprecated names (typing.io, ...) warns
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(obj)
            if not doc or len(doc) < MIN_CHARS or doc in seen:
                continue
            seen.add(doc)
            docs.append({"text": f"{qualname}\n\n{doc}"})
            if max_docs is not None and len(docs) >= max_docs:
                return docs
    return docs
