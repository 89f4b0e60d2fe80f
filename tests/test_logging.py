"""One logger root, ``idfuse``: every logger of models/ and nodes/ is one of its children, none has a
handler or a level of its own (ComfyUI's log shows them through the root logger), nothing prints,
and messages carry no hand-typed prefix (the logger's name says where a line comes from)."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest
from source_scan import PACK_ROOT, SOURCES, dotted, parsed, relative

ROOT = "idfuse"
# The children of the root: one per package of models/, and the node layer.
CHILDREN = {"tokens", "encoders", "faces", "training", "infinite_id", "nodes"}
LOG_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "log"}
# "IDFuse trainer: ...", "IDFuse: ...", "[IDFuse] ...": the logger's name already says this.
HAND_TYPED_PREFIX = re.compile(r"^\s*(\[?IDFuse\b|\[[\w .-]+\])", re.IGNORECASE)





def is_get_logger(call: ast.Call) -> bool:
    return dotted(call.func) in ("logging.getLogger", "getLogger")


def calls(tree: ast.AST):
    return (node for node in ast.walk(tree) if isinstance(node, ast.Call))


def logger_names(tree: ast.Module) -> set[str]:
    """Variables a module binds to a logger (``log = logging.getLogger(...)``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and is_get_logger(node.value):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def message_start(node: ast.expr) -> str | None:
    """The literal text a message starts with (a string or the first part of an f-string)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def violations(path: Path, root: Path = PACK_ROOT) -> list[str]:
    tree = parsed(path)
    where = relative(path, root)
    loggers = logger_names(tree)
    found = []
    for call in calls(tree):
        name = dotted(call.func)
        line = f"{where}:{call.lineno}"
        if is_get_logger(call):
            literal = call.args[0].value if call.args and isinstance(call.args[0], ast.Constant) else None
            parts = literal.split(".") if isinstance(literal, str) else []
            if not (parts and parts[0] == ROOT and (len(parts) == 1 or parts[1] in CHILDREN)):
                found.append(f"{line}: getLogger({ast.unparse(call.args[0]) if call.args else ''}) is not "
                             f"'{ROOT}' or '{ROOT}.<{'|'.join(sorted(CHILDREN))}>[...]'")
        elif name == "print":
            found.append(f"{line}: print(...); log through the package's logger")
        elif name.endswith(".addHandler") or name in ("logging.basicConfig", "basicConfig"):
            found.append(f"{line}: {name}(...); ComfyUI's handlers show the pack's log")
        elif name.endswith(".setLevel"):
            found.append(f"{line}: {name}(...); ComfyUI's settings decide what is shown")
        elif isinstance(call.func, ast.Attribute) and call.func.attr in LOG_METHODS:
            receiver = dotted(call.func.value)
            if receiver == "logging":
                found.append(f"{line}: {name}(...) logs to the root logger, not under '{ROOT}'")
            elif receiver in loggers:
                position = 1 if call.func.attr == "log" else 0
                start = message_start(call.args[position]) if len(call.args) > position else None
                if start is not None and HAND_TYPED_PREFIX.match(start):
                    found.append(f"{line}: message starts with a hand-typed prefix: {start[:40]!r}")
    return found


def test_the_scan_covers_the_pack():
    assert len(SOURCES) > 20
    names = {relative(p) for p in SOURCES}
    assert {"models/tokens/format.py", "nodes/tokens.py", "nodes/glue/infinite_id.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=relative)
def test_loggers_messages_and_output(path):
    assert violations(path) == []


def test_the_scan_finds_what_it_forbids(tmp_path):
    """The checks above can fail: a module with every forbidden pattern yields one violation each."""
    source = tmp_path / "bad.py"
    source.write_text(
        "import logging\n"
        "log = logging.getLogger(__name__)\n"
        "other = logging.getLogger('idfuse.somewhere')\n"
        "fine = logging.getLogger('idfuse.training.loop')\n"
        "log.addHandler(logging.StreamHandler())\n"
        "log.setLevel(logging.DEBUG)\n"
        "print('step', 3)\n"
        "logging.info('to the root')\n"
        "fine.info('IDFuse trainer: saved step %d', 3)\n"
        "fine.warning(f'[IDFuse] {3} photos')\n"
        "fine.log(logging.INFO, 'IDFuse: done')\n"
        "fine.info('Saved step %d to %s', 3, 'x')\n",
        encoding="utf-8")
    found = violations(source, tmp_path)
    assert len(found) == 9, found


def test_root_logger_has_no_handler_and_propagates():
    for name in [ROOT, *(f"{ROOT}.{child}" for child in sorted(CHILDREN))]:
        logger = logging.getLogger(name)
        assert logger.handlers == [], name
        assert logger.propagate, name
        assert logger.level == logging.NOTSET, name
    for name, logger in logging.Logger.manager.loggerDict.items():
        if name.startswith(f"{ROOT}.") and isinstance(logger, logging.Logger):
            assert logger.handlers == [] and logger.propagate and logger.level == logging.NOTSET, name


def test_a_node_logs_under_the_root(caplog):
    """What a node logs reaches the handlers above ``idfuse`` (ComfyUI's), named by its package."""
    import folder_paths
    from factories import make_id_tokens

    from comfyui_idfuse.nodes.tokens import IDFuseLoadIDTokens

    folder = folder_paths.get_folder_paths("idfuse_tokens")[0]
    make_id_tokens().save(f"{folder}/logged.safetensors")
    with caplog.at_level(logging.INFO):
        IDFuseLoadIDTokens().load("logged.safetensors")
    (record,) = [r for r in caplog.records if "logged.safetensors" in r.getMessage()]
    assert record.name == f"{ROOT}.nodes" and record.levelno == logging.INFO
