"""Making a frozen ComfyUI model trainable through, without changing it. Plain torch.

ComfyUI loads models under torch.inference_mode, keeps every weight trainable-flagged, and (in the
late-2024 core) adds residuals in place. Each context manager here changes one of those things for
the duration of training and undoes it afterwards, so the MODEL a node received is left as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger("idfuse.training")


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """requires_grad off for every parameter of the modules, restored afterwards."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for param, _ in saved:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in saved:
            param.requires_grad_(flag)


@contextmanager
def autograd_safe_residuals(*modules: nn.Module) -> Iterator[None]:
    """Clone the input of every LayerNorm while the context is open.

    The late-2024 core adds residuals in place (``x += attn(norm(x))`` in CLIP and UNet
    transformer blocks); once x needs a gradient, autograd rejects the in-place change of the
    tensor the LayerNorm saved. A clone gives the LayerNorm its own copy. Newer cores add out of
    place; there the clone is only a cheap copy.
    """
    def clone_input(_module, args):
        return (args[0].clone(), *args[1:])

    handles = [m.register_forward_pre_hook(clone_input)
               for root in modules for m in root.modules() if isinstance(m, nn.LayerNorm)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _normal_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor on the same memory as an inference tensor: autograd may save it, and
    nothing is copied (a copy of SD1.5's weights would cost gigabytes). The frozen weights are
    not written during training, so sharing their storage is safe."""
    with torch.inference_mode(False):
        alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


@contextmanager
def without_inference_tensors(*modules: nn.Module) -> Iterator[None]:
    """Swap weights created under torch.inference_mode (ComfyUI loads models there) for normal
    tensors sharing their memory, which autograd may save for the backward pass; the originals
    come back afterwards."""
    swapped: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
    try:
        for root in modules:
            for module in root.modules():
                for name, param in list(module._parameters.items()):
                    if param is not None and param.is_inference():
                        swapped.append((module, name, True, param))
                        module._parameters[name] = nn.Parameter(_normal_alias(param), requires_grad=False)
                for name, buffer in list(module._buffers.items()):
                    if buffer is not None and buffer.is_inference():
                        swapped.append((module, name, False, buffer))
                        module._buffers[name] = _normal_alias(buffer)
        if swapped:
            log.info("%d inference-mode tensors aliased so autograd can use them", len(swapped))
        yield
    finally:
        for module, name, is_param, original in reversed(swapped):
            (module._parameters if is_param else module._buffers)[name] = original


@contextmanager
def gradient_checkpointing(diffusion_model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Recompute each UNet layer (ResBlock, spatial transformer) in the backward pass instead of
    keeping its activations. Each call runs on its own copy of the option dicts it was given, so a
    recomputation sees the block name it first saw, not the one the UNet moved on to."""
    if not enabled:
        yield
        return
    targets = [layer for attribute in ("input_blocks", "middle_block", "output_blocks")
               for block in _blocks(getattr(diffusion_model, attribute, None))
               for layer in block if _has_parameters(layer)]

    def wrap(layer: nn.Module):
        original = layer.forward

        def forward(*args, **kwargs):
            frozen_args = [dict(a) if isinstance(a, dict) else a for a in args]
            frozen_kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            first_options: list[dict] = []

            def run():
                call_args = [dict(a) if isinstance(a, dict) else a for a in frozen_args]
                call_kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in frozen_kwargs.items()}
                out = original(*call_args, **call_kwargs)
                if not first_options:
                    first_options.extend(d for d in [*call_args, *call_kwargs.values()] if isinstance(d, dict))
                return out

            out = checkpoint(run, use_reentrant=False)
            # Changes the layer made to the caller's dicts (transformer_index) still reach the caller.
            for given, seen in zip([a for a in [*args, *kwargs.values()] if isinstance(a, dict)], first_options,
                                   strict=False):
                given.update(seen)
            return out
        layer.forward = forward

    try:
        for layer in targets:
            wrap(layer)
        yield
    finally:
        for layer in targets:
            layer.__dict__.pop("forward", None)


def _blocks(container) -> list[nn.Module]:
    if container is None:
        return []
    return [container] if not isinstance(container, nn.ModuleList) else list(container)


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


@contextmanager
def training_context(*, unet: nn.Module, text_encoders: nn.Module, checkpointing: bool) -> Iterator[None]:
    """Everything that makes the frozen models usable for training, undone when the context closes."""
    with ExitStack() as stack:
        stack.enter_context(without_inference_tensors(unet, text_encoders))
        stack.enter_context(frozen(unet, text_encoders))
        stack.enter_context(autograd_safe_residuals(unet, text_encoders))
        stack.enter_context(gradient_checkpointing(unet, checkpointing))
        yield


# Key under which the denoiser puts the values context into transformer_options for the patch below.
VALUES_CONTEXT = "idfuse_training_values_context"


class ValuesContextPatch:
    """``attn2_patch``: the cross-attention values come from the V-vector encoding of the prompt
    (``transformer_options[VALUES_CONTEXT]``) while the keys come from the K-vector encoding, which
    is the model's context. Without that option the layer is left alone."""

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        values = extra_options.get(VALUES_CONTEXT)
        if values is None:
            return n, context, value
        return n, context, values.to(context.dtype)
