"""The floors are enforced: the import contracts of pyproject.toml (``lint-imports``) hold for
the code as it is, and each one breaks when a module makes the wrong import.

The check runs on a copy of the packages, so a wrong import can be written into a module
without touching the working tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("flashsale", "allocator", "workers", "reconciler", "gateway", "loadtest", "lua")
LINT = Path(sys.executable).with_name("lint-imports")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("tree")
    for name in PACKAGES:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def lint(tree: Path) -> tuple[int, dict[str, str]]:
    """lint-imports over ``tree``: its exit code and each contract's verdict, by name."""
    result = subprocess.run(
        [str(LINT), "--no-cache"], cwd=tree, capture_output=True, text=True, timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "400"},
    )  # fmt: skip
    verdicts = {}
    for line in result.stdout.splitlines():
        for verdict in (" KEPT", " BROKEN"):
            if verdict in line:
                verdicts[line.split(verdict)[0].strip()] = verdict.strip()
    return result.returncode, verdicts


def test_the_code_keeps_every_contract(tree: Path) -> None:
    code, verdicts = lint(tree)
    assert len(verdicts) == 6, verdicts
    assert set(verdicts.values()) == {"KEPT"}, verdicts
    assert code == 0


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("flashsale/keys.py", "from gateway import app", "Floors:"),
        ("allocator/pump.py", "from reconciler import audit", "Floors:"),
        ("reconciler/audit.py", "from workers import saga", "Workers and the reconciler"),
        ("allocator/sweeper.py", "from loadtest import bench", "Nothing but the composition"),
        ("workers/saga.py", "from flashsale.cli import main", "Nothing imports the composition"),
        ("gateway/catalog.py", "import asyncpg", "The gateway imports no SQL driver"),
        ("gateway/state.py", "from gateway import admin", "No import cycles"),
    ],
)
def test_a_wrong_import_breaks_its_contract(
    tree: Path, module: str, line: str, contract: str
) -> None:
    path = tree / module
    original = path.read_text()
    path.write_text(f"{original}\n{line}  # deliberately wrong\n")
    try:
        code, verdicts = lint(tree)
    finally:
        path.write_text(original)
    broken = [name for name, verdict in verdicts.items() if verdict == "BROKEN"]
    assert code != 0
    assert any(name.startswith(contract) for name in broken), verdicts
