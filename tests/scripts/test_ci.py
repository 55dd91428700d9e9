"""`.ci/run` cleans up only what it made: pip's cache of the run lives under CI's build/ folder and is
deleted there, where `pip cache purge` emptied the user's whole cache."""

import re

from conftest import ROOT


def _commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_ci_keeps_pip_cache_inside_build():
    commands = _commands()
    assert not any("cache purge" in c for c in commands)
    export = commands.index("export PIP_CACHE_DIR=$PWD/build/pip-cache")
    first_pip = next(i for i, c in enumerate(commands) if re.match(r"(pip_install|python -m pip|\S+/pip) ", c))
    assert export < first_pip  # every install of the run uses it
    removed = [target for c in commands for target in re.findall(r"rm -rf\s+\"?([^\"\s']+)", c)]
    assert removed and all(t == "$PIP_CACHE_DIR" or t.startswith("build/") for t in removed), removed
