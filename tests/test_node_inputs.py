"""Every node's FLOAT and INT inputs are checked before the node runs: NaN, ±inf and values outside
the declared [min, max] are an IDFuseInputError naming the node, the input, the value and the range."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from factories import make_clip, make_id_tokens, make_model

import comfyui_idfuse
from comfyui_idfuse import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui_idfuse.models.errors import IDFuseInputError
from comfyui_idfuse.nodes import encoders, faces, infinite_id, tokens, train
from comfyui_idfuse.nodes.glue.inputs import (
    check_numeric_input,
    checks_inputs,
    guard_numeric_inputs,
    is_guarded,
    numeric_inputs,
)

NODE_MODULES = (tokens, train, faces, encoders, infinite_id)


class Sentinel:
    """Stands for a non-numeric input: the check must not need it (and the node must not run)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<sentinel {self.name}>"


def valid_arguments(node) -> dict:
    """Keyword arguments for the node's FUNCTION: numbers at their defaults, sentinels for the rest."""
    arguments = {}
    for section in ("required", "optional"):
        for name, spec in node.INPUT_TYPES().get(section, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            arguments[name] = options["default"] if spec[0] in ("FLOAT", "INT") else Sentinel(name)
    return arguments


def inputs_of_kind(kinds: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(node_id, name) for node_id, node in sorted(NODE_CLASS_MAPPINGS.items())
            for name, (kind, _, _) in numeric_inputs(node.INPUT_TYPES()).items() if kind in kinds]


def ranged_inputs() -> list[tuple[str, str, str, object]]:
    cases = []
    for node_id, name in inputs_of_kind(("FLOAT", "INT")):
        kind, options, _ = numeric_inputs(NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES())[name]
        if "min" in options:
            cases.append((node_id, name, "below", options["min"] - (1 if kind == "INT" else 1e-6)))
        if "max" in options:
            cases.append((node_id, name, "above", options["max"] + (1 if kind == "INT" else 1e-6)))
    return cases


def run_node(node_id: str, **changes):
    node = NODE_CLASS_MAPPINGS[node_id]
    return getattr(node(), node.FUNCTION)(**{**valid_arguments(node), **changes})  # as ComfyUI calls it


FLOAT_INPUTS = inputs_of_kind(("FLOAT",))


def test_the_nodes_have_float_and_int_inputs_to_check():
    # Guards the parametrisations below against silently finding nothing.
    names = {f"{node_id}.{name}" for node_id, name in inputs_of_kind(("FLOAT", "INT"))}
    assert {"IDFuseApplyIDTokens.strength", "IDFuseApplyIDTokens.start_percent", "IDFuseInfiniteIDSampler.denoise",
            "IDFuseTrainingOptions.min_snr_gamma", "IDFuseTrainIdentity.learning_rate",
            "IDFuseFaceEmbed.face_index", "IDFuseInfiniteIDSampler.seed"} <= names
    assert len(FLOAT_INPUTS) >= 20


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("node_id", "name"), FLOAT_INPUTS, ids=[f"{n}.{i}" for n, i in FLOAT_INPUTS])
def test_non_finite_float_is_refused_before_the_node_runs(node_id, name, value):
    with pytest.raises(IDFuseInputError) as error:
        run_node(node_id, **{name: value})
    message = str(error.value)
    assert message.startswith(f"{NODE_DISPLAY_NAME_MAPPINGS[node_id]}: the input {name} is ")
    assert ("NaN" if math.isnan(value) else str(value)) in message and f"Set {name} to" in message


@pytest.mark.parametrize(("node_id", "name", "side", "value"), ranged_inputs(),
                         ids=[f"{n}.{i}-{s}" for n, i, s, _ in ranged_inputs()])
def test_value_outside_the_declared_range_is_refused(node_id, name, side, value):
    _, options, _ = numeric_inputs(NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES())[name]
    with pytest.raises(IDFuseInputError, match=f"the input {name} is .*outside its range") as error:
        run_node(node_id, **{name: value})
    assert f"from {options['min']} to {options['max']}" in str(error.value)


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_valid_values_reach_the_node(node_id):
    """The installed wrapper is ``checks_inputs`` over the node's own method; the same wrapper over a
    recorder gets every argument unchanged, at the defaults and at both ends of every range."""
    node = NODE_CLASS_MAPPINGS[node_id]
    received = []

    def recorder(self, **kwargs):
        received.append(kwargs)
        return ("reached",)

    checked = checks_inputs(recorder, node, NODE_DISPLAY_NAME_MAPPINGS[node_id])
    arguments = valid_arguments(node)
    assert checked(node(), **arguments) == ("reached",) and received[-1] == arguments
    for name, (_, options, _) in numeric_inputs(node.INPUT_TYPES()).items():
        for end in ("min", "max"):
            if end in options:
                checked(node(), **{**arguments, name: options[end]})
                assert received[-1][name] == options[end]


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_every_node_is_guarded_and_otherwise_unchanged(node_id):
    node = NODE_CLASS_MAPPINGS[node_id]
    method = inspect.getattr_static(node, node.FUNCTION)
    assert is_guarded(node), f"{node_id}.{node.FUNCTION} does not check its numeric inputs"
    assert method.__name__ == node.FUNCTION and method.__qualname__ == f"{node.__name__}.{node.FUNCTION}"
    original = method.__wrapped__
    assert not is_guarded(type("Plain", (), {"FUNCTION": "run", "run": original}))
    assert inspect.signature(method) == inspect.signature(original)  # ComfyUI and tests see the real parameters
    assert method.__doc__ == original.__doc__ and method.__module__ == original.__module__
    guard_numeric_inputs(node, NODE_DISPLAY_NAME_MAPPINGS[node_id])  # a second pass does not wrap again
    assert inspect.getattr_static(node, node.FUNCTION) is method


def test_every_node_class_of_the_node_modules_is_registered_and_guarded():
    """A node added to a module without reaching the pack's NODE_CLASS_MAPPINGS (and so the guard) fails here."""
    assert comfyui_idfuse.NODE_CLASS_MAPPINGS is NODE_CLASS_MAPPINGS
    registered = set(NODE_CLASS_MAPPINGS.values())
    for module in NODE_MODULES:
        for name, value in vars(module).items():
            if inspect.isclass(value) and value.__module__ == module.__name__ and hasattr(value, "FUNCTION"):
                assert value in registered, f"{module.__name__}.{name} is not in NODE_CLASS_MAPPINGS"
                assert is_guarded(value), f"{module.__name__}.{name} does not check its numeric inputs"
        assert set(module.NODE_CLASS_MAPPINGS.items()) <= set(NODE_CLASS_MAPPINGS.items())


def test_positional_calls_and_kwargs_methods_are_checked():
    apply = NODE_CLASS_MAPPINGS["IDFuseApplyIDTokens"]().apply
    with pytest.raises(IDFuseInputError, match="the input start_percent is NaN"):
        apply(Sentinel("model"), Sentinel("conditioning"), 1.0, math.nan, 1.0)
    # The Infinite-ID nodes take their ID inputs through **kwargs.
    with pytest.raises(IDFuseInputError, match="IDFuse Infinite-ID Guider: the input mix_end_percent is inf"):
        run_node("IDFuseInfiniteIDGuider", mix_end_percent=math.inf)


def test_check_numeric_input_cases():
    options = {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05}
    for fine in (0.0, 2.0, 1.03, 1, torch.tensor(0.5)):  # between steps is fine: step only shapes the widget
        check_numeric_input("Node", "strength", "FLOAT", options, fine)
    check_numeric_input("Node", "seed", "INT", {"min": 0, "max": 0xffffffffffffffff}, 0xffffffffffffffff)
    check_numeric_input("Node", "free", "FLOAT", {}, 1e300)
    with pytest.raises(IDFuseInputError, match=r"^Node: the input seed is 18446744073709551616, outside its range; "
                                               r"it must be a whole number from 0 to 18446744073709551615\."):
        check_numeric_input("Node", "seed", "INT", {"min": 0, "max": 0xffffffffffffffff}, 0x10000000000000000)
    with pytest.raises(IDFuseInputError, match=r"strength is NaN \(not a number\); it must be a finite number from "
                                               r"0.0 to 2.0. Set strength to such a value \(default 1.0\)"):
        check_numeric_input("Node", "strength", "FLOAT", options, float("nan"))
    with pytest.raises(IDFuseInputError, match="is -inf"):
        check_numeric_input("Node", "free", "FLOAT", {}, -math.inf)
    with pytest.raises(IDFuseInputError, match="is NaN"):  # NaN from a tensor, e.g. a linked value
        check_numeric_input("Node", "free", "FLOAT", {}, torch.tensor(float("nan")))
    for not_a_number in ("0.5", None, True, [1.0]):
        with pytest.raises(IDFuseInputError, match="not a number"):
            check_numeric_input("Node", "strength", "FLOAT", options, not_a_number)
    with pytest.raises(IDFuseInputError, match="of at least 1"):
        check_numeric_input("Node", "steps", "INT", {"min": 1}, 0)


def test_absent_or_unconnected_optional_numbers_are_not_checked():
    class Node:
        FUNCTION = "run"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"weight": ("FLOAT", {"min": 0.0, "max": 1.0})},
                    "optional": {"extra": ("INT", {"min": 0, "max": 3})}}

        @staticmethod
        def run(weight, extra=None):
            return (weight, extra)

    guard_numeric_inputs(Node, "Test Node")
    assert Node().run(0.5) == (0.5, None) and Node().run(0.5, extra=None) == (0.5, None)
    assert Node.run(weight=1.0, extra=3) == (1.0, 3)  # staticmethods stay static
    with pytest.raises(IDFuseInputError, match="Test Node: the input extra is 4"):
        Node().run(0.5, 4)


def test_apply_id_tokens_strength_nan_through_the_real_path(tokenizer_dir):
    """The issue's case: NaN strength gave an all-NaN image without a word; now it is an error, and a
    valid strength still patches the model."""
    model = make_model("sd15")
    positive = NODE_CLASS_MAPPINGS["IDFuseEncodeWithID"]().encode(make_clip("sd15", tokenizer_dir), make_id_tokens(),
                                                                   "a photo of sks")[0]
    apply = NODE_CLASS_MAPPINGS["IDFuseApplyIDTokens"]().apply
    with pytest.raises(IDFuseInputError, match="IDFuse Apply ID Tokens: the input strength is NaN"):
        apply(model=model, conditioning=positive, strength=float("nan"), start_percent=0.0, end_percent=1.0)
    (patched,) = apply(model=model, conditioning=positive, strength=0.5, start_percent=0.0, end_percent=1.0)
    assert patched is not model and patched.model_options["transformer_options"]["patches"]["attn2_patch"]
