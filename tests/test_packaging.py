"""What the package promises: it ships every package of the source tree, the floors of its
dependencies match the features the code uses, and the engine runs where uvloop cannot be
installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from flashsale import event_loop
from flashsale.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_the_distribution_ships_every_package_of_the_source_tree() -> None:
    """``pip install .`` (not ``-e``) installs only the packages pyproject.toml lists:
    ``loadtest.chaos`` was not among them, so ``flashsale chaos`` failed to import outside a
    checkout of the repository."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])  # fmt: skip
    found = {".".join(init.parent.relative_to(ROOT).parts)
             for root in {name.split(".")[0] for name in listed}
             for init in (ROOT / root).rglob("__init__.py")}  # fmt: skip
    assert found - listed == set()


def floors() -> dict[str, tuple[int, ...]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found: dict[str, tuple[int, ...]] = {}
    for group in (project["dependencies"], *project["optional-dependencies"].values()):
        for spec in group:
            match = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?>=([\d.]+)", spec)
            if match:
                found[match.group(1).lower()] = tuple(int(p) for p in match.group(2).split("."))
    return found


def uses(pattern: str, *folders: str) -> bool:
    return any(re.search(pattern, path.read_text())
               for folder in folders for path in (ROOT / folder).rglob("*.py"))  # fmt: skip


def test_the_floors_cover_the_features_the_code_uses() -> None:
    declared = floors()
    if uses(r"web\.ResponseKey", "gateway", "flashsale"):
        assert declared["aiohttp"] >= (3, 14)
    pytest_ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    if "asyncio_default_test_loop_scope" in pytest_ini["ini_options"]:
        assert declared["pytest-asyncio"] >= (0, 26)
    if uses(r"^import requests", "loadtest", "tests"):
        assert "requests" in declared  # not only as locust's dependency


def test_the_engine_runs_on_asyncio_where_uvloop_is_missing(stack: Settings) -> None:
    assert event_loop.name() == "uvloop"  # here, where its wheel installs
    script = ("import sys; sys.modules['uvloop'] = None\n"  # import uvloop now fails
              "from flashsale import event_loop\n"
              "from flashsale.cli import main\n"
              "print(event_loop.name())\n"
              "sys.exit(main(['sale', 'list']))\n")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=os.environ.copy(), timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "asyncio"


def test_make_alone_lists_what_each_target_does() -> None:
    """`make` with no target made the virtual environment and said nothing of the rest: a
    newcomer typing `make` learnt neither of the two commands. Every target of the Makefile's
    .PHONY list is named, with what it does."""
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*?)(?<!\\)$", makefile, re.M | re.S)
    assert phony is not None
    targets = set(phony.group(1).replace("\\", " ").split())
    said = subprocess.run(["make", "-s", "-C", str(ROOT)], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert said.returncode == 0, said.stderr
    named = {line.split()[1] for line in said.stdout.splitlines()
             if line.startswith("make ") and len(line.split()) > 2}  # fmt: skip
    assert targets - {"help"} <= named, sorted(targets - named)
    assert said.stdout.index("make demo") < said.stdout.index("make lint")  # the two first
