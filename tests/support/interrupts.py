"""Interrupting a training run at a known phase and step, however often ComfyUI checks.

ComfyUI raises a user's interrupt from ``comfy.model_management.throw_exception_if_processing_interrupted``.
The late-2024 core and 0.3.64 call it at progress-bar updates (through the server's hook) and between
nodes; 0.8 also calls it at the start of every cast-aware layer's forward (``comfy/ops.py``), thousands
of times per training run. A test that counts those calls interrupts somewhere else on every version.
These helpers choose the place by what the run is doing instead:

=================  =============================================================================
phase              fires
=================  =============================================================================
encode_photos      in the forward of the ``call``-th layer of the VAE's encoder
evaluate_before    in the forward of the ``call``-th UNet layer run without gradients, before any
                   layer ran with gradients (the evaluation before training)
step               in the forward of the ``call``-th UNet layer run with gradients while step
                   ``step`` (1-based) is computed: mid-step, mid-forward
sample             in a UNet layer run without gradients between training steps (a sample render)
evaluate_after     in a UNet layer run without gradients after the last step was reported
between_steps      when the progress bar reports ``step`` steps done (where ComfyUI's server checks)
save               when the ``call``-th file is put in place in the models folder while the state
                   after ``step`` steps is saved (``step=None``: any save)
=================  =============================================================================

"Layer" means a module with parameters of its own (Linear, Conv2d, GroupNorm, LayerNorm: what
ComfyUI's cast-aware ops are); ``layer="…"`` counts only the module at that path inside the UNet (or
inside the VAE's encoder for encode_photos).

What the helpers expect of the run, and nothing else of the trainer:

- the UNet is ``model.model.diffusion_model`` of the MODEL given (clones share it); the VAE's encoder
  is ``vae.first_stage_model.encoder``;
- training steps run the UNet with gradients enabled, evaluation and sampling without;
- steps done are reported through ``comfy.utils.ProgressBar(total).update_absolute(done, total, ...)``
  on a bar made after the helper was entered (ProgressBar reads the global hook when it is made);
- files are put in place with ``os.replace`` below ``folder_paths.models_dir`` (the pack's atomic writes).

The interrupt is ComfyUI's own: the helper sets the flag (``interrupt_current_processing``) and calls
``throw_exception_if_processing_interrupted`` right there, so ``InterruptProcessingException`` comes
from ComfyUI and clears the flag, as 0.8's per-layer check does when the user cancels at that
moment. With ``flag_only=True`` it only sets the flag and the next check of this ComfyUI raises
(where that is depends on the version: that is the point of the default). The flag is cleared on exit
either way, so an interrupt that never fired cannot leak into the next test.

    with interrupt_at("step", model=parts["model"], step=3, call=40) as interrupt:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(...)
    interrupt.assert_fired()
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

PHASES = ("encode_photos", "evaluate_before", "step", "sample", "evaluate_after", "between_steps", "save")
LAYER_PHASES = ("encode_photos", "evaluate_before", "step", "sample", "evaluate_after")


@dataclass(frozen=True)
class Interruption:
    """Where an interrupt was raised."""

    phase: str
    step: int | None  # the step being computed (step), steps done (between_steps, save, evaluate_*)
    call: int  # the how-manieth matching layer call or file write
    where: str  # module path ("unet.middle_block.1…", "vae_encoder.conv_in") or file name


@dataclass
class Interrupter:
    """The plan and what the run did. ``fired`` is set once the interrupt was raised."""

    phase: str
    step: int | None = None
    call: int = 1
    layer: str | None = None
    total_steps: int | None = None
    flag_only: bool = False
    fired: Interruption | None = None
    steps_done: int | None = None  # as last reported by the progress bar
    total: int | None = None
    seen: collections.Counter = field(default_factory=collections.Counter)  # phase -> layer calls / writes
    _count: int = 0
    _trained: bool = False  # a UNet layer ran with gradients
    _gradients_since_report: bool = False

    def assert_fired(self) -> Interruption:
        assert self.fired is not None, (
            f"The interrupt at {self.phase} (step {self.step}, call {self.call}, layer {self.layer}) never fired; "
            f"the run showed {dict(self.seen)} and reported {self.steps_done} of {self.total} steps.")
        return self.fired

    # -- what the run is doing --

    def _layer_phase(self, network: str) -> str:
        if network == "vae_encoder":
            return "encode_photos"
        if torch.is_grad_enabled():
            self._trained = self._gradients_since_report = True
            return "step"
        if not self._trained:
            return "evaluate_before"
        return "evaluate_after" if self.total is not None and self.steps_done == self.total else "sample"

    def _step_of(self, phase: str) -> int:
        done = self.steps_done or 0
        if phase == "step" or (phase == "save" and self._gradients_since_report):
            return done + 1
        return done

    def on_layer(self, network: str, name: str) -> None:
        phase = self._layer_phase(network)
        self.seen[phase] += 1
        if self.phase not in LAYER_PHASES or phase != self.phase:
            return
        if self.layer is not None and name != self.layer:
            return
        self._match(phase, self._step_of(phase), f"{network}.{name}")

    def on_progress(self, value: int, total: int) -> None:
        if self.total_steps is not None and total != self.total_steps:
            return
        self.steps_done, self.total, self._gradients_since_report = int(value), int(total), False
        self.seen["between_steps"] += 1
        if self.phase == "between_steps":
            self._match("between_steps", self.steps_done, f"progress {value}/{total}")

    def on_write(self, destination: str) -> None:
        self.seen["save"] += 1
        if self.phase == "save":
            self._match("save", self._step_of("save"), Path(destination).name)

    def _match(self, phase: str, step: int, where: str) -> None:
        if self.fired is not None or (self.step is not None and self.step != step):
            return
        self._count += 1
        if self._count == self.call:
            self._raise(Interruption(phase, step, self._count, where))

    def _raise(self, interruption: Interruption) -> None:
        import comfy.model_management

        self.fired = interruption
        comfy.model_management.interrupt_current_processing(True)
        if not self.flag_only:
            comfy.model_management.throw_exception_if_processing_interrupted()


def _layers(root: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in root.named_modules()
            if any(True for _ in module.parameters(recurse=False))]


def _hook_layers(stack: ExitStack, interrupter: Interrupter, network: str, root: nn.Module) -> None:
    layers = _layers(root)
    if interrupter.layer is not None and network == _network_of(interrupter.phase):
        known = {name for name, _ in layers}
        if interrupter.layer not in known:
            raise ValueError(f"No layer with parameters at '{interrupter.layer}' in the {network}; e.g. "
                             f"{sorted(known)[:3]}")
    for name, module in layers:
        handle = module.register_forward_pre_hook(lambda _m, _args, name=name: interrupter.on_layer(network, name))
        stack.callback(handle.remove)


def _network_of(phase: str) -> str:
    return "vae_encoder" if phase == "encode_photos" else "unet"


@contextmanager
def interrupt_at(phase: str, *, model, vae=None, step: int | None = None, call: int = 1, layer: str | None = None,
                 total_steps: int | None = None, flag_only: bool = False) -> Iterator[Interrupter]:
    """Raise ComfyUI's interrupt once, at ``phase`` (see the module docstring), during the block.

    model: the MODEL (ModelPatcher) the run trains against. vae: its VAE (needed for encode_photos).
    step: which step (None: the first match of any step). call: the how-manieth matching layer call or
    file write. layer: count only this module path (inside the UNet or the VAE's encoder).
    total_steps: count only progress bars of this total (other bars' reports are ignored).
    """
    import comfy.model_management
    import comfy.utils
    import folder_paths

    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, not {phase!r}")
    if phase == "encode_photos" and vae is None:
        raise ValueError("encode_photos needs the run's VAE")
    interrupter = Interrupter(phase, step, call, layer, total_steps, flag_only)
    with ExitStack() as stack:
        _hook_layers(stack, interrupter, "unet", model.model.diffusion_model)
        if vae is not None:
            _hook_layers(stack, interrupter, "vae_encoder", vae.first_stage_model.encoder)

        previous_hook = comfy.utils.PROGRESS_BAR_HOOK

        def progress_hook(value, total, preview, *args, **kwargs):
            if previous_hook is not None:
                previous_hook(value, total, preview, *args, **kwargs)
            interrupter.on_progress(value, total)

        comfy.utils.set_progress_bar_global_hook(progress_hook)
        stack.callback(comfy.utils.set_progress_bar_global_hook, previous_hook)

        models_dir = Path(folder_paths.models_dir).resolve()
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst).resolve().is_relative_to(models_dir):
                interrupter.on_write(os.fspath(dst))
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
        stack.callback(setattr, os, "replace", real_replace)
        stack.callback(comfy.model_management.interrupt_current_processing, False)
        yield interrupter


@contextmanager
def interrupt_in_forward(module: nn.Module, call: int = 1, with_gradients: bool | None = True) -> Iterator[Interrupter]:
    """Raise ComfyUI's interrupt from inside ``module``'s forward (a pre-hook) on its ``call``-th call.

    with_gradients: count only calls with gradients enabled (True: training steps), only without
    (False: evaluation, sampling), or every call (None).
    """
    import comfy.model_management

    interrupter = Interrupter("step" if with_gradients else "layer", call=call)

    def pre_hook(_module, _args):
        if with_gradients is not None and torch.is_grad_enabled() != with_gradients:
            return
        interrupter.seen[interrupter.phase] += 1
        if interrupter.fired is None and interrupter.seen[interrupter.phase] == call:
            interrupter._raise(Interruption(interrupter.phase, None, call, type(module).__name__))

    handle = module.register_forward_pre_hook(pre_hook)
    try:
        yield interrupter
    finally:
        handle.remove()
        comfy.model_management.interrupt_current_processing(False)
