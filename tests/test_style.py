"""House rules that code review alone would let slip (../shared/STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "isa4d"
SINGLE_DEVICE = ("models", "diffusion", "body", "metrics", "geometry", "render")
FORBIDDEN = ("lightning", "pytorch_lightning", "torch.distributed")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_model_code_is_single_device_pytorch():
    """Nothing under models/, diffusion/, body/, metrics/, geometry/ or render/ imports Lightning or torch.distributed."""
    offenders = []
    for pkg in SINGLE_DEVICE:
        for path in (SRC / pkg).rglob("*.py"):
            bad = [n for n in _imports(path) if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)]
            offenders += [f"{path.relative_to(SRC)}: {b}" for b in bad]
    assert not offenders, offenders


def test_source_files_stay_small():
    """Past ~400 lines a file holds more than one concept (STYLE.md rule 2)."""
    long = [f"{p.relative_to(SRC)} ({n})" for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450]
    assert not long, long
