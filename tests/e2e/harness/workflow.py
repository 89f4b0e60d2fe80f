"""A workflow saved by the ComfyUI frontend, converted into the API format the server runs."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Frontend-only nodes: never sent to the server.
UI_ONLY_NODE_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
MODE_MUTED = 2  # LGraphEventMode.NEVER
MODE_BYPASS = 4  # LGraphEventMode.BYPASS
# Input types the frontend (1.2x) turns into widgets (ComfyWidgets); custom widget types
# registered by a pack's JavaScript can be added by the caller through ``widget_types``.
WIDGET_TYPES = frozenset({
    "INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN", "IMAGEUPLOAD", "FILEUPLOAD", "COLOR",
    "IMAGECOMPARE", "TREESELECT", "MULTISELECT", "CHART", "GALLERIA", "SELECTBUTTON", "TEXTAREA",
})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize", "increment-wrap"})
_SEED_NAMES = ("seed", "noise_seed")


@dataclass(frozen=True)
class _Link:
    origin_id: str
    origin_slot: int
    target_id: str
    target_slot: int
    type: str


@dataclass(frozen=True)
class _Literal:
    value: Any


def load_workflow(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return dict(json.load(handle))


def _spec_parts(spec: Any) -> tuple[Any, dict[str, Any]]:
    if isinstance(spec, (list, tuple)) and spec:
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        return spec[0], options
    return spec, {}


def _is_combo(type_: Any) -> bool:
    return isinstance(type_, (list, tuple)) or type_ == "COMBO"


def _is_widget(spec: Any, optional: bool, widget_types: frozenset[str]) -> bool:
    type_, options = _spec_parts(spec)
    if options.get("forceInput") or (optional and options.get("defaultInput")):
        return False
    if _is_combo(type_):
        return True
    return str(options.get("widgetType") or type_) in widget_types


def _control_widgets(name: str, spec: Any) -> int:
    """How many frontend-only widgets follow this input's widget (control_after_generate & co)."""
    type_, options = _spec_parts(spec)
    if type_ == "INT":
        control = options.get("control_after_generate")
        if control is None:
            control = name in _SEED_NAMES
        return 1 if control else 0
    if _is_combo(type_) and options.get("control_after_generate"):
        return 2  # the control combo and its "control_filter_list" string
    return 0


def _ordered_inputs(node_info: Mapping[str, Any]) -> list[tuple[str, Any, bool]]:
    """(name, spec, optional) in the frontend's order: input_order required, optional, the rest."""
    inputs = node_info.get("input") or {}
    order = node_info.get("input_order") or {}
    result: list[tuple[str, Any, bool]] = []
    seen: set[str] = set()
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        names = list(order.get(section) or specs.keys())
        for name in names:
            if name in specs and name not in seen:
                result.append((name, specs[name], section == "optional"))
                seen.add(name)
    for section in ("required", "optional"):
        for name, spec in (inputs.get(section) or {}).items():
            if name not in seen:
                result.append((name, spec, section == "optional"))
                seen.add(name)
    return result


def _widget_values(node: Mapping[str, Any], node_info: Mapping[str, Any],
                   widget_types: frozenset[str]) -> dict[str, Any]:
    values = node.get("widgets_values")
    if values is None:
        return {}
    ordered = _ordered_inputs(node_info)
    if isinstance(values, Mapping):  # some packs save widgets by name
        return {name: values[name] for name, spec, optional in ordered
                if name in values and _is_widget(spec, optional, widget_types)}
    widgets = [(name, spec, True) for name, spec, optional in ordered if _is_widget(spec, optional, widget_types)]
    # Old workflows kept a value for forceInput inputs too (the frontend's migrateWidgetsValues).
    legacy = [(name, spec, _is_widget(spec, optional, widget_types)) for name, spec, optional in ordered
              if _is_widget(spec, optional, widget_types) or _spec_parts(spec)[1].get("forceInput")]
    if len(legacy) != len(widgets):
        legacy_count = sum(2 if (_spec_parts(spec)[1].get("control_after_generate") or name in _SEED_NAMES) else 1
                           for name, spec, _ in legacy)
        if legacy_count == len(values):
            widgets = legacy
    result: dict[str, Any] = {}
    index = 0
    for name, spec, is_widget in widgets:
        if index >= len(values):
            break
        value = values[index]
        index += 1
        if is_widget and value is not None:  # None: a hole left by a non-serialised widget
            result[name] = value
        extra = _control_widgets(name, spec)
        if extra and index < len(values):
            control = values[index]
            # Tolerate hand-written workflows that leave the control value out.
            if control is None or isinstance(control, bool) or (isinstance(control, str) and control in CONTROL_VALUES):
                index += extra
    return result


def _parse_links(raw_links: Iterable[Any]) -> dict[int, _Link]:
    links: dict[int, _Link] = {}
    for raw in raw_links or []:
        if isinstance(raw, Mapping):  # workflow schema 1 stores links as objects
            link_id, origin, origin_slot = raw["id"], raw["origin_id"], raw["origin_slot"]
            target, target_slot, type_ = raw["target_id"], raw["target_slot"], raw.get("type", "*")
        else:
            link_id, origin, origin_slot, target, target_slot, type_ = raw[:6]
        links[int(link_id)] = _Link(str(origin), int(origin_slot), str(target), int(target_slot), str(type_))
    return links


def _types_match(a: Any, b: Any) -> bool:
    a, b = str(a or "*"), str(b or "*")
    if a == b or "*" in (a, b):
        return True
    return bool(set(a.split(",")) & set(b.split(",")))


def _bypass_input(node: Mapping[str, Any], slot: int, link_type: str) -> Mapping[str, Any] | None:
    """The input a bypassed node passes through to output ``slot`` (the frontend's rule)."""
    inputs = list(node.get("inputs") or [])
    outputs = list(node.get("outputs") or [])
    out_type = outputs[slot].get("type", link_type) if slot < len(outputs) else link_type
    if not inputs:
        return None
    if str(out_type) == "*":
        return inputs[slot] if slot < len(inputs) else inputs[0]
    if slot < len(inputs) and _types_match(inputs[slot].get("type"), out_type):
        return inputs[slot]
    for candidate in inputs:
        if str(candidate.get("type")) == str(out_type):
            return candidate
    for candidate in inputs:
        if _types_match(candidate.get("type"), out_type):
            return candidate
    return None


def _resolve(link_id: int | None, nodes: Mapping[str, Mapping[str, Any]], links: Mapping[int, _Link],
             depth: int = 0) -> list[Any] | _Literal | None:
    """Follow a link back through reroutes, primitives and bypassed nodes to a real output."""
    if link_id is None or depth > 256:
        return None
    link = links.get(int(link_id))
    if link is None:
        return None
    origin = nodes.get(link.origin_id)
    if origin is None:
        return None
    type_ = origin.get("type")
    if type_ == "Reroute":
        first = (origin.get("inputs") or [{}])[0]
        return _resolve(first.get("link"), nodes, links, depth + 1)
    if type_ == "PrimitiveNode":
        values = origin.get("widgets_values") or []
        return _Literal(values[0]) if values else None
    mode = origin.get("mode", 0)
    if mode == MODE_MUTED or type_ in UI_ONLY_NODE_TYPES:
        return None
    if mode == MODE_BYPASS:
        passed = _bypass_input(origin, link.origin_slot, link.type)
        return None if passed is None else _resolve(passed.get("link"), nodes, links, depth + 1)
    return [str(origin["id"]), link.origin_slot]


def ui_to_api(ui_workflow: Mapping[str, Any], object_info: Mapping[str, Any],
              widget_types: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Convert a frontend workflow (``nodes`` + ``links``) to an API prompt ``{id: {class_type, inputs}}``.

    Widget values are mapped by position onto the node's widget inputs in ``object_info``'s
    order (required, then optional), skipping the frontend-only ``control_after_generate``
    value after seed-like INT widgets (and the control + filter values after combos that ask
    for one). Linked inputs, including widgets converted to inputs, take their link: through
    ``Reroute`` nodes, from ``PrimitiveNode`` values, and through bypassed nodes (mode 4) as
    the frontend does. Notes, reroutes, primitives, muted (mode 2) and bypassed nodes are left out.
    """
    types = WIDGET_TYPES | frozenset(widget_types)
    subgraphs = {str(sub.get("id")) for sub in ((ui_workflow.get("definitions") or {}).get("subgraphs") or [])}
    nodes = {str(node["id"]): node for node in ui_workflow.get("nodes") or []}
    links = _parse_links(ui_workflow.get("links") or [])
    api: dict[str, dict[str, Any]] = {}
    for node_id, node in nodes.items():
        class_type = str(node.get("type"))
        if class_type in UI_ONLY_NODE_TYPES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
            continue
        if class_type in subgraphs:
            raise NotImplementedError(f"node {node_id} is a subgraph ({class_type}); unpack it in the frontend first")
        if class_type not in object_info:
            raise KeyError(f"node {node_id}: unknown node type {class_type!r} (a pack not loaded, "
                           f"or a frontend-only node)")
        node_info = object_info[class_type]
        inputs = _widget_values(node, node_info, types)
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            name = str((slot.get("widget") or {}).get("name") or slot["name"])
            source = _resolve(slot["link"], nodes, links)
            if source is None:
                continue  # from a muted node: the widget value (if any) stays
            inputs[name] = source.value if isinstance(source, _Literal) else source
        title = node.get("title") or node_info.get("display_name") or class_type
        api[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
    return api


def override_inputs(api_graph: dict[str, dict[str, Any]], target: str, /, **values: Any) -> list[str]:
    """Set input values on every node of class ``target`` (or on the node with id ``target``).

    Returns the ids changed; raises ``KeyError`` when nothing matches so that a renamed node
    does not silently leave a real model name or a 20-step sampler in a test.
    """
    if target in api_graph:
        ids = [target]
    else:
        ids = [node_id for node_id, node in api_graph.items() if node["class_type"] == target]
    if not ids:
        raise KeyError(f"no node of class or id {target!r} in the graph")
    for node_id in ids:
        api_graph[node_id]["inputs"].update(values)
    return ids


def strip_meta(api_graph: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The graph without ``_meta`` (for comparisons)."""
    return {node_id: {key: value for key, value in node.items() if key != "_meta"}
            for node_id, node in api_graph.items()}


def without_identity(api_graph: Mapping[str, Mapping[str, Any]], placeholder: str = "sks",
                     initializer: str = "person") -> dict[str, dict[str, Any]]:
    """A token workflow's graph as a plain prompt: IDFuse Encode With ID becomes CLIPTextEncode of the text with
    the initialiser word in the placeholder's place, and IDFuse Apply ID Tokens is taken out (the sampler gets
    its input model)."""
    plain = copy.deepcopy(dict(api_graph))
    encode_id = next(i for i, n in plain.items() if n["class_type"] == "IDFuseEncodeWithID")
    apply_id = next(i for i, n in plain.items() if n["class_type"] == "IDFuseApplyIDTokens")
    sampler = next(i for i, n in plain.items() if n["class_type"] == "KSampler")
    text = plain[encode_id]["inputs"]["text"].replace(placeholder, initializer)
    plain[encode_id] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": plain[encode_id]["inputs"]["clip"]}}
    plain[sampler]["inputs"]["model"] = plain[apply_id]["inputs"]["model"]
    del plain[apply_id]
    return plain


def trained_files_graph(checkpoint: str, lora: str, tokens: str, size: int, filename_prefix: str
                        ) -> dict[str, dict[str, Any]]:
    """A trained identity used the ordinary way: core's LoraLoader with its LoRA, the token nodes with its tokens,
    a 2-step KSampler at size², saved."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "lora": {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": lora,
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
        "tokens": {"class_type": "IDFuseLoadIDTokens", "inputs": {"tokens_name": tokens}},
        "encode": {"class_type": "IDFuseEncodeWithID", "inputs": {"clip": ["lora", 1], "id_tokens": ["tokens", 0],
                                                                  "text": "an old sks person, oil painting"}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["lora", 1], "text": "blurry"}},
        "apply": {"class_type": "IDFuseApplyIDTokens", "inputs": {"model": ["lora", 0], "conditioning": ["encode", 0],
                                                                  "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {"model": ["apply", 0], "positive": ["encode", 0],
                                                        "negative": ["negative", 0], "latent_image": ["latent", 0],
                                                        "seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
                                                        "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": filename_prefix}},
    }


def small_sampling(api_graph: dict[str, dict[str, Any]], checkpoint: str, seed: int, size: int = 64,
                   steps: int = 2) -> dict[str, dict[str, Any]]:
    """A sampling workflow made cheap for a test: the test checkpoint, a ``steps``-step KSampler with ``seed``,
    a size² empty latent."""
    override_inputs(api_graph, "CheckpointLoaderSimple", ckpt_name=checkpoint)
    override_inputs(api_graph, "KSampler", steps=steps, seed=seed)
    override_inputs(api_graph, "EmptyLatentImage", width=size, height=size)
    return api_graph
