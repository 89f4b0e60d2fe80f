"""Guardrails of the layout described in docs/ARCHITECTURE.md, checked on the source text (nothing is imported):

- ``models/`` is plain torch: no module in it imports ComfyUI (or the pack's node layer), at the top or
  inside a function;
- a module of ``nodes/`` outside ``nodes/glue/`` holds node classes: its NODE_CLASS_MAPPINGS, and no other
  public function or class (their helpers live in ``nodes/glue/``);
- no text file of the project refers to documents outside the repository.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[1]
MODELS = PACK / "models"
NODES = PACK / "nodes"
GLUE = NODES / "glue"

# Top-level modules of the ComfyUI host: importing any of them ties code to a running ComfyUI.
HOST_MODULES = frozenset({"comfy", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server", "execution"})

# Public top-level names a node module may define besides its node classes.
NODE_MODULE_NAMES = frozenset({"NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "log"})
CONSTANT = re.compile(r"^[A-Z][A-Z0-9_]*$")

TEXT_SUFFIXES = frozenset({".py", ".md", ".json", ".toml", ".txt", ".sh", ".ini", ".cfg", ".yaml", ".yml"})
SKIPPED_DIRS = frozenset({".git", "__pycache__", ".ruff_cache", ".pytest_cache", ".venv", "venv"})

# What a reference to a document outside the repository looks like. Written so that this file does not
# match its own patterns.
OUTSIDE_REFERENCES: dict[str, re.Pattern[str]] = {
    "a sibling folder of the repository": re.compile(r"\.\./+shared\b"),
    "an absolute path of the machine the pack was built on": re.compile(r"[/]work[/]"),
    "a developers' document that is not in the repository": re.compile(r"DEVELOPERS\.md"),
    "the team's method notes": re.compile(r"shared/+METHOD\.md"),
}
# Outside docs/, the method doc is named by its path in the repository: a bare name would be read as
# the notes it replaced.
BARE_METHOD_DOC = re.compile(r"(?<![\w/])METHOD\.md")


# --------------------------------------------------------------------------------------------- helpers


def python_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not SKIPPED_DIRS & set(p.relative_to(PACK).parts))


def relative(path: Path) -> str:
    return path.relative_to(PACK).as_posix()


def package_of(path: Path) -> tuple[str, ...]:
    """The package relative imports of a module start from: models/training/lora.py -> ("models", "training"),
    models/training/__init__.py -> ("models", "training") too."""
    return path.relative_to(PACK).parts[:-1]


def _resolved(package: tuple[str, ...], level: int, module: str | None) -> str | None:
    """The pack-relative dotted name of a relative import, or None when it climbs out of the pack."""
    if level - 1 > len(package):
        return None
    base = list(package[:len(package) - (level - 1)])
    if module:
        base += module.split(".")
    return ".".join(base)


def imports(source: str, package: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """Every import of a module at any depth: (line, "host" | "pack", dotted name).

    "host" names are absolute imports (and ``importlib.import_module`` / ``__import__`` of a literal);
    "pack" names are relative imports resolved against the pack root ("" when one climbs out of it).
    """
    found: list[tuple[int, str, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, "host", alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, "host", node.module or ""))
                continue
            target = _resolved(package, node.level, node.module)
            if target is None:
                found.append((node.lineno, "pack", ""))
            elif node.module:
                found.append((node.lineno, "pack", target))
            else:  # from .. import a, b: each name may be a module
                found += [(node.lineno, "pack", f"{target}.{alias.name}".lstrip(".")) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            if name in ("import_module", "__import__"):
                found.append((node.lineno, "host", node.args[0].value))
    return found


def forbidden_in_models(source: str, package: tuple[str, ...]) -> list[tuple[int, str]]:
    """Imports a module of models/ must not make: the ComfyUI host, or any part of the pack outside models/."""
    bad = []
    for line, kind, name in imports(source, package):
        top = name.split(".")[0]
        if kind == "host" and top in HOST_MODULES:
            bad.append((line, name))
        elif kind == "pack" and top != "models":
            bad.append((line, f"(relative) {name or 'outside the pack'}"))
    return sorted(bad)


def node_module_problems(source: str) -> list[tuple[int, str]]:
    """What makes a module of nodes/ more than node classes."""
    tree = ast.parse(source)
    classes = {n.name: n.lineno for n in tree.body if isinstance(n, ast.ClassDef)}
    mappings: dict[str, ast.expr] = {}
    problems: list[tuple[int, str]] = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else []
        for target in targets:
            if not isinstance(target, ast.Name):
                continue
            name = target.id
            if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
                mappings[name] = node.value
            elif name.startswith("_"):
                continue
            elif isinstance(node.value, ast.Lambda):
                problems.append((node.lineno, f"public function {name} (a lambda)"))
            elif not (CONSTANT.match(name) or name in NODE_MODULE_NAMES):
                problems.append((node.lineno, f"public module variable {name}"))

    registered = mappings.get("NODE_CLASS_MAPPINGS")
    if not isinstance(registered, ast.Dict) or not registered.keys:
        return [(1, "no NODE_CLASS_MAPPINGS dict of this module's node classes"), *problems]
    node_classes = set()
    for value in registered.values:
        if isinstance(value, ast.Name) and value.id in classes:
            node_classes.add(value.id)
        else:
            problems.append((value.lineno, f"NODE_CLASS_MAPPINGS value {ast.unparse(value)} is not a class "
                                           f"defined in this module"))
    display = mappings.get("NODE_DISPLAY_NAME_MAPPINGS")
    ids = {ast.literal_eval(k) for k in registered.keys if k is not None}
    if not isinstance(display, ast.Dict) or {ast.literal_eval(k) for k in display.keys if k is not None} != ids:
        problems.append((registered.lineno, "NODE_DISPLAY_NAME_MAPPINGS does not name exactly the node IDs of "
                                            "NODE_CLASS_MAPPINGS"))

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            problems.append((node.lineno, f"public function {node.name}"))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_") and node.name not in node_classes:
            problems.append((node.lineno, f"public class {node.name} that is not a registered node"))
    return sorted(problems)


def project_text_files() -> list[Path]:
    """The project's text files: git's tracked and not-ignored files when this is a checkout, else a walk."""
    names: list[str] | None = None
    if (PACK / ".git").exists():
        try:
            listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                    cwd=PACK, capture_output=True, check=True, timeout=60)
            names = [n for n in listed.stdout.decode("utf-8").split("\0") if n]
        except (OSError, subprocess.SubprocessError):
            names = None
    if names is None:
        names = []
        for folder, dirs, files in os.walk(PACK):
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
            names += [os.path.relpath(os.path.join(folder, name), PACK) for name in files]
    paths = []
    for name in sorted(set(names)):
        path = PACK / name
        if SKIPPED_DIRS & set(Path(name).parts) or not path.is_file():  # a moved file is still in git's index
            continue
        if path.suffix in TEXT_SUFFIXES or (not path.suffix and path.read_bytes()[:2] == b"#!"):
            paths.append(path)
    return paths


def outside_references(text: str, in_docs: bool) -> list[tuple[int, str]]:
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for what, pattern in OUTSIDE_REFERENCES.items():
            if pattern.search(line):
                found.append((number, what))
        if not in_docs and BARE_METHOD_DOC.search(line):
            found.append((number, "a method doc named without its folder (write docs/METHOD.md)"))
    return found


def report(offences: list[str]) -> str:
    return "\n  " + "\n  ".join(offences)


# ----------------------------------------------------------------------------------------------- tests


def test_models_is_plain_torch():
    files = python_files(MODELS)
    assert files, f"no modules found under {MODELS}"
    offences = [f"{relative(path)}:{line}: imports {name}"
                for path in files
                for line, name in forbidden_in_models(path.read_text(encoding="utf-8"), package_of(path))]
    assert not offences, "models/ must not import ComfyUI or the node layer:" + report(offences)


def test_node_modules_hold_node_classes_only():
    modules = [p for p in python_files(NODES) if p.name != "__init__.py" and GLUE not in p.parents]
    assert modules, f"no node modules found under {NODES}"
    offences = [f"{relative(path)}:{line}: {problem}"
                for path in modules for line, problem in node_module_problems(path.read_text(encoding="utf-8"))]
    assert not offences, ("a module of nodes/ holds node classes only; helpers go to nodes/glue/:"
                          + report(offences))


def test_every_node_module_is_registered():
    """nodes/__init__.py collects the node modules; one it does not import is never offered to ComfyUI."""
    package = ast.parse((NODES / "__init__.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(package):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module is None:
                imported |= {alias.name for alias in node.names}
            else:
                imported.add(node.module.split(".")[0])
    modules = {p.stem for p in NODES.glob("*.py") if p.name != "__init__.py"}
    assert modules <= imported, f"nodes/__init__.py does not import the node modules {sorted(modules - imported)}"


def defines_nodes(source: str) -> bool:
    """Whether a module assigns NODE_CLASS_MAPPINGS at its top level."""
    return any(isinstance(target, ast.Name) and target.id == "NODE_CLASS_MAPPINGS"
               for node in ast.parse(source).body if isinstance(node, (ast.Assign, ast.AnnAssign))
               for target in (node.targets if isinstance(node, ast.Assign) else [node.target]))


def test_glue_defines_no_nodes():
    offences = [relative(p) for p in python_files(GLUE) if defines_nodes(p.read_text(encoding="utf-8"))]
    assert not offences, "node classes belong in nodes/, not nodes/glue/:" + report(offences)


def test_no_file_refers_to_documents_outside_the_repository():
    files = project_text_files()
    assert any(p.name == "README.md" for p in files), "the project's files were not found"
    docs = PACK / "docs"
    offences = [f"{relative(path)}:{line}: {what}"
                for path in files
                for line, what in outside_references(path.read_text(encoding="utf-8", errors="replace"),
                                                      in_docs=docs in path.parents)]
    assert not offences, "refers to documents outside the repository:" + report(offences)


# --- the checks themselves catch what they are for


@pytest.mark.parametrize(("source", "package", "expected"), [
    ("import torch\nfrom ..unet import BlockKey\nfrom . import masks\n", ("models", "faces"), []),
    ("import comfy.model_management\n", ("models",), [(1, "comfy.model_management")]),
    ("def f():\n    import folder_paths\n", ("models", "tokens"), [(2, "folder_paths")]),
    ("def f():\n    from comfy_extras.nodes_train import X\n", ("models",), [(2, "comfy_extras.nodes_train")]),
    ("import nodes\nimport server\nfrom execution import PromptExecutor\n", ("models",),
     [(1, "nodes"), (2, "server"), (3, "execution")]),
    ("from ...nodes.glue.folders import X\n", ("models", "training"), [(1, "(relative) nodes.glue.folders")]),
    ("from .. import nodes\n", ("models",), [(1, "(relative) nodes")]),
    ("from ..... import x\n", ("models", "a"), [(1, "(relative) outside the pack")]),
    ("import importlib\nm = importlib.import_module('comfy.utils')\n", ("models",), [(2, "comfy.utils")]),
])
def test_models_scan_finds_host_imports(source, package, expected):
    assert forbidden_in_models(source, package) == expected


NODE_MODULE = '''
import logging
log = logging.getLogger("idfuse.nodes")
CATEGORY = "IDFuse/x"
class IDFuseThing:
    pass
def _helper():
    pass
NODE_CLASS_MAPPINGS = {"IDFuseThing": IDFuseThing}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFuseThing": "IDFuse Thing"}
'''


def test_node_module_scan():
    assert node_module_problems(NODE_MODULE) == []
    extra = NODE_MODULE + "def encoder_choices():\n    pass\nclass Loaded:\n    pass\ncache = {}\n"
    assert [problem for _line, problem in node_module_problems(extra)] == [
        "public function encoder_choices", "public class Loaded that is not a registered node",
        "public module variable cache"]
    assert node_module_problems("class IDFuseThing:\n    pass\n")[0][1].startswith("no NODE_CLASS_MAPPINGS")
    assert defines_nodes(NODE_MODULE) and not defines_nodes('"""Helpers; no NODE_CLASS_MAPPINGS here."""\n')
    unnamed = NODE_MODULE.replace('{"IDFuseThing": "IDFuse Thing"}', "{}")
    assert any("NODE_DISPLAY_NAME_MAPPINGS" in p for _line, p in node_module_problems(unnamed))


def test_outside_reference_scan():
    # Assembled from pieces, so that this file does not match the patterns it tests.
    up, machine, notes, developers = "..", "/wo" + "rk", "METHOD" + ".md", "DEVELOPERS" + ".md"
    lines = [f"see {up}/shared/{notes}", f"run {machine}/venv/bin/python", f"see {developers}",
             f"see docs/{notes}", f"{notes} section 1"]
    text = "\n".join(lines)
    assert [line for line, _what in outside_references(text, in_docs=False)] == [1, 1, 2, 3, 5]
    assert [line for line, _what in outside_references(text, in_docs=True)] == [1, 1, 2, 3]
