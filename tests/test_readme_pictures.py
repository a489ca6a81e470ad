"""The README's hold lifecycle diagram stays true to the code: it draws exactly the hold
states the record codec knows, and each of its arrows is named after a script in ``lua/``
that makes that move."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

from flashsale.records import HoldState

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _diagrams(kind: str) -> list[str]:
    blocks = re.findall(r"```mermaid\n(.*?)```", README.read_text(), re.S)
    return [b for b in blocks if b.startswith(kind)]


def test_the_hold_lifecycle_diagram_draws_the_hold_states_and_their_scripts() -> None:
    [diagram] = _diagrams("stateDiagram")
    arrows = re.findall(r"^\s*(\S+) --> (\S+?)(?:: (.*))?$", diagram, re.M)
    states = {s for a, b, _ in arrows for s in (a, b)} - {"[*]"}
    assert states == set(get_args(HoldState))
    scripts = {p.stem for p in (ROOT / "lua").glob("*.lua")}
    for source, target, label in arrows:
        if target == "[*]":
            continue
        named = set(re.findall(r"[a-z_]+", label)) & scripts
        assert named, f"{source} --> {target}: no script of lua/ named in {label!r}"
