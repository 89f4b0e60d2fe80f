"""What a ComfyUI user sees of every node: a description, a category, a tooltip on every input
and output, a display name and a help page (web/docs/<node>.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

import comfyui_idfuse
from comfyui_idfuse import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

DOCS = Path(comfyui_idfuse.__file__).parent / "web" / "docs"


@pytest.mark.parametrize("name", sorted(NODE_CLASS_MAPPINGS))
def test_node_explains_itself(name):
    node = NODE_CLASS_MAPPINGS[name]
    assert name.startswith("IDFuse") and NODE_DISPLAY_NAME_MAPPINGS[name].startswith("IDFuse ")
    assert node.CATEGORY.startswith("IDFuse") and len(node.DESCRIPTION) > 60
    assert callable(getattr(node, node.FUNCTION))
    inputs = node.INPUT_TYPES()
    for section in ("required", "optional"):
        for input_name, spec in inputs.get(section, {}).items():
            assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    assert len(node.OUTPUT_TOOLTIPS) == len(node.RETURN_TYPES) == len(getattr(node, "RETURN_NAMES", node.RETURN_TYPES))
    page = DOCS / f"{name}.md"
    assert page.is_file(), f"no help page {page}"
    text = page.read_text(encoding="utf-8")
    assert text.startswith(f"# {NODE_DISPLAY_NAME_MAPPINGS[name]}")
    for input_name in inputs.get("required", {}):
        assert input_name in text, f"{page.name} does not mention the input {input_name}"


def test_every_help_page_belongs_to_a_node():
    assert {p.stem for p in DOCS.glob("*.md")} == set(NODE_CLASS_MAPPINGS)
