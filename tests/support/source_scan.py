"""Reading the pack's own source for the guard tests (errors, logging): which files, parsed how."""

from __future__ import annotations

import ast
from pathlib import Path

import comfyui_idfuse

PACK_ROOT = Path(comfyui_idfuse.__file__).resolve().parent
# The pack's code: models/ and nodes/ (tests, bench and the pack root's __init__ are not scanned).
SOURCES = sorted(p for folder in ("models", "nodes") for p in (PACK_ROOT / folder).rglob("*.py"))


def relative(path: Path, root: Path = PACK_ROOT) -> str:
    return path.relative_to(root).as_posix()


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def dotted(node: ast.expr) -> str:
    """'logging.getLogger' for the expression logging.getLogger; '' for anything but names and attributes."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""
