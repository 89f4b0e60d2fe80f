"""The numeric inputs of every node, checked before the node runs: finite, and inside the range its
``INPUT_TYPES`` declares.

ComfyUI checks min/max of widget values sent through its API in most versions, but not NaN (NaN
compares false with everything), and not values that reach a node another way (a linked number, a
direct call). A NaN strength would give an all-NaN image without a word, a NaN percent an IndexError
deep in ComfyUI's core; here both are an IDFuseInputError naming the node and the input.

Only values outside [min, max] and non-finite ones are refused: ComfyUI's ``step``/``round`` only
shape the widget, so a value between steps is still used.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

from ...models.errors import IDFuseInputError

NUMERIC_KINDS = ("FLOAT", "INT")
# Marks a FUNCTION method that checks its inputs (so it is wrapped once, and tests can tell).
CHECKED_MARK = "__idfuse_checks_inputs__"


def numeric_inputs(input_types: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[str, dict, bool]]:
    """Every FLOAT and INT input of an ``INPUT_TYPES()`` result: name -> (kind, options, optional)."""
    found = {}
    for section, optional in (("required", False), ("optional", True)):
        for name, spec in input_types.get(section, {}).items():
            kind = spec[0] if isinstance(spec, (tuple, list)) and spec else None
            if isinstance(kind, str) and kind in NUMERIC_KINDS:
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
                found[name] = (kind, dict(options), optional)
    return found


def _allowed(kind: str, low: Any, high: Any) -> str:
    what = "a finite number" if kind == "FLOAT" else "a whole number"
    if low is not None and high is not None:
        return f"{what} from {low} to {high}"
    if low is not None:
        return f"{what} of at least {low}"
    if high is not None:
        return f"{what} of at most {high}"
    return what


def check_numeric_input(node: str, name: str, kind: str, options: Mapping[str, Any], value: Any) -> None:
    """Raise IDFuseInputError unless ``value`` is a finite number inside the input's declared [min, max]."""
    low, high = options.get("min"), options.get("max")
    if isinstance(value, bool) or not _is_number(value):
        problem = f"is {value!r}, not a number"
    elif not isinstance(value, int) and math.isnan(float(value)):
        problem = "is NaN (not a number)"
    elif not isinstance(value, int) and math.isinf(float(value)):
        problem = f"is {float(value)} (infinite)"
    elif (low is not None and value < low) or (high is not None and value > high):
        problem = f"is {value}, outside its range"
    else:
        return
    allowed = _allowed(kind, low, high)
    default = f" (default {options['default']})" if "default" in options else ""
    raise IDFuseInputError(f"{node}: the input {name} {problem}; it must be {allowed}. Set {name} to such a "
                           f"value{default} in the node, or in the workflow file or API request that sets it.")


def _is_number(value: Any) -> bool:
    try:
        float(value)  # int, float, numpy and 0-d torch numbers alike
    except (TypeError, ValueError, OverflowError):
        return isinstance(value, int)  # an int too large for a float is still a number
    return not isinstance(value, (str, bytes))


def check_node_inputs(node_class: type, display_name: str, arguments: Mapping[str, Any]) -> None:
    """Check every FLOAT/INT input of ``node_class`` present in ``arguments`` (absent optional ones are skipped)."""
    for name, (kind, options, optional) in numeric_inputs(node_class.INPUT_TYPES()).items():
        if name not in arguments or (optional and arguments[name] is None):
            continue
        check_numeric_input(display_name, name, kind, options, arguments[name])


def _named_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by input name (positional ones too, and those gathered by ``**kwargs``)."""
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:  # a wrong call: the node itself raises the usual error
        return kwargs
    named = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


def checks_inputs(function: Callable, node_class: type, display_name: str) -> Callable:
    """``function`` (a node's FUNCTION) preceded by the check of its numeric inputs."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def checked(*args, **kwargs):
        check_node_inputs(node_class, display_name, _named_arguments(signature, args, kwargs))
        return function(*args, **kwargs)

    setattr(checked, CHECKED_MARK, True)
    return checked


def guard_numeric_inputs(node_class: type, display_name: str) -> None:
    """Make the node's FUNCTION method check its numeric inputs first (once; the class is otherwise unchanged)."""
    method_name = node_class.FUNCTION
    raw = inspect.getattr_static(node_class, method_name)
    wrapper = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    function = raw.__func__ if wrapper else raw
    if getattr(function, CHECKED_MARK, False):
        return
    checked = checks_inputs(function, node_class, display_name)
    setattr(node_class, method_name, wrapper(checked) if wrapper else checked)


def is_guarded(node_class: type) -> bool:
    raw = inspect.getattr_static(node_class, node_class.FUNCTION)
    return getattr(getattr(raw, "__func__", raw), CHECKED_MARK, False)
