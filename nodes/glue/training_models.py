"""The frozen MODEL and CLIP as the trainer's callables: prompts encoded with the placeholder's
vectors spliced in (without re-entering model management), the patched model's x0 prediction with
keys and values from two contexts, and the precision the run computes in."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from comfy.ldm.modules.attention import optimized_attention

from ...models.errors import TrainingError
from ...models.training.frozen import VALUES_CONTEXT, ValuesContextPatch
from ...models.training.probes import AttentionProbes
from ...models.training.settings import TrainingSettings
from ...models.unet import FAMILY_NAMES, cross_attention_path, select_layers
from .id_encoding import single_token_id
from .model_info import TOKENIZER_KEYS

log = logging.getLogger("idfuse.nodes")


def _template_text(template: str, word: str, label: str, fix: str) -> str:
    """``template`` with ``word`` where its one ``{}`` is; ``label`` names it and ``fix`` says what to do
    in the error when it has no or several ``{}``."""
    if template.count("{}") != 1:
        raise TrainingError(f"{label} must contain '{{}}' exactly once (where the placeholder goes){fix}")
    return template.replace("{}", word)


def encode_loaded(clip, tokens: dict, return_pooled: bool = False):
    """``clip.encode_from_tokens(tokens, return_pooled)`` for a CLIP the run has already loaded: the
    same clip options (reset, clip_layer, the execution device newer ComfyUI sets) and the same
    ``encode_token_weights``, without its ``load_model()``. That call goes through model management
    on every prompt and can partially unload the UNet being trained; the run loads both once.
    (encode_from_tokens adds hooks only to its ``return_dict`` form, which the trainer does not use.)"""
    encoder = clip.cond_stage_model
    encoder.reset_clip_options()
    if clip.layer_idx is not None:
        encoder.set_clip_options({"layer": clip.layer_idx})
    if any(hasattr(m, "execution_device") for m in encoder.modules()):  # newer ComfyUI sets it after loading
        encoder.set_clip_options({"execution_device": clip.patcher.load_device})
    cond, pooled = encoder.encode_token_weights(tokens)[:2]
    return (cond, pooled) if return_pooled else cond


class SplicingTextEncoder:
    """Encodes prompts with ComfyUI's CLIP (loaded by the run), the placeholder's input-embedding rows
    replaced by vectors.

    The placeholder stays an ordinary token id; a forward hook on each text encoder's token
    embedding swaps its output rows at that id for the given vector (out of place, so autograd
    reaches the vector). ComfyUI's own "tensor instead of token id" path copies vectors in place in
    the late-2024 core and would cut the gradient.
    """

    def __init__(self, clip, family: str, settings: TrainingSettings, templates: Sequence[str] | None = None):
        """``templates``: the prompt table's templates (settings.templates, then the photos' caption templates);
        without them settings.templates."""
        self.clip = clip
        self.templates = tuple(settings.templates if templates is None else templates)
        self.num_shared = len(settings.templates)
        self.names = TOKENIZER_KEYS[family]  # tokenizer key -> encoder name
        self.placeholder_ids = {k: single_token_id(clip, settings.placeholder, k, "placeholder") for k in self.names}
        self.initializer_ids = {k: single_token_id(clip, settings.initializer, k, "initialiser") for k in self.names}
        if self.placeholder_ids == self.initializer_ids:
            raise TrainingError("The placeholder and the initialiser are the same word; the placeholder must be a "
                                "new, rare word such as 'sks'.")
        self.embeddings = {name: getattr(clip.cond_stage_model, name).transformer.get_input_embeddings()
                           for name in self.names.values()}
        self.tokens = [clip.tokenize(self._text(i, settings.placeholder)) for i in range(len(self.templates))]
        self.reference_tokens = [clip.tokenize(self._text(i, settings.initializer)) for i in range(len(self.templates))]
        self.placeholder_positions = self._positions(self.tokens, self.placeholder_ids)
        self.reference_positions = self._positions(self.reference_tokens, self.initializer_ids)
        self._vectors: dict[str, torch.Tensor] | None = None

    def _label(self, index: int) -> str:
        """How messages name template ``index``: a prompt template, or a photo's caption."""
        if index < self.num_shared:
            return f"Prompt template {index + 1} '{self.templates[index]}'"
        return f"The caption template '{self.templates[index]}' (from a photo's caption)"

    def _text(self, index: int, word: str) -> str:
        fix = ", e.g. 'a photo of the face of {}'." if index < self.num_shared else "; edit the caption file."
        return _template_text(self.templates[index], word, self._label(index), fix)

    def _positions(self, all_tokens: list[dict], ids: dict[str, int]) -> torch.Tensor:
        positions = []
        for index, tokens in enumerate(all_tokens):
            found = set()
            for key, chunks in tokens.items():
                if len(chunks) != 1:
                    raise TrainingError(f"{self._label(index)} is longer than one 77-token chunk; use a shorter "
                                        f"{'template' if index < self.num_shared else 'caption'}.")
                hits = [i for i, t in enumerate(chunks[0]) if isinstance(t[0], int) and t[0] == ids[key]]
                if len(hits) != 1:
                    raise TrainingError(f"{self._label(index)} holds the word {len(hits)} times after tokenising; "
                                        f"write the placeholder only once.")
                found.add(hits[0])
            if len(found) != 1:
                raise TrainingError(f"{self._label(index)}: the text encoders put the word at different positions "
                                    f"{sorted(found)}.")
            positions.append(found.pop())
        return torch.tensor(positions)

    def initializer_embeddings(self) -> dict[str, torch.Tensor]:
        return {name: self.embeddings[name].weight[self.initializer_ids[key]].detach().float().cpu().clone()
                for key, name in self.names.items()}

    def hooks(self) -> ExitStack:
        stack = ExitStack()
        for key, name in self.names.items():
            handle = self.embeddings[name].register_forward_hook(self._hook(name, self.placeholder_ids[key]))
            stack.callback(handle.remove)
        return stack

    def _hook(self, name: str, token_id: int):
        def hook(_module, args, output):
            if self._vectors is None:
                return None
            rows = args[0] == token_id
            if not bool(rows.any()):
                return None
            spliced = output.clone()
            spliced[rows] = self._vectors[name].to(device=output.device, dtype=output.dtype)
            return spliced
        return hook

    def encode(self, template: int, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        self._vectors = vectors
        try:
            return encode_loaded(self.clip, self.tokens[template])
        finally:
            self._vectors = None

    def encode_reference(self, template: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt with the initialiser word: the v2 reference prompt, and (SDXL) the pooled output
        that IDFuse Encode With ID also takes from the plain prompt."""
        with torch.no_grad():
            cond, pooled = encode_loaded(self.clip, self.reference_tokens[template], return_pooled=True)
        return cond.float(), None if pooled is None else pooled.float()


class Denoiser:
    """x0 prediction of the patched model clone through ComfyUI's own apply_model (its model_sampling,
    its extra conditioning), keys from one context and values from another."""

    def __init__(self, patched, extra_conds: list[dict[str, torch.Tensor]]):
        self.patched = patched
        self.extra_conds = extra_conds

    def __call__(self, x, sigma, keys_context, values_context, templates: list[int]) -> torch.Tensor:
        options = dict(self.patched.model_options.get("transformer_options", {}))
        options.update({VALUES_CONTEXT: values_context, "cond_or_uncond": [0], "sigmas": sigma})
        extra = {name: torch.cat([self.extra_conds[t][name] for t in templates]).to(x.device)
                 for name in self.extra_conds[templates[0]]}
        return self.patched.model.apply_model(x, sigma, c_crossattn=keys_context, transformer_options=options, **extra)


def patched_clone(model, family: str, settings: TrainingSettings) -> tuple[object, AttentionProbes]:
    """A clone of MODEL with the values patch on every cross-attention layer and explicit-attention
    probes on the loss layers; the input MODEL keeps its options."""
    layers = select_layers(family, settings.loss_downscales)
    if not layers:
        raise TrainingError(f"loss_layers {settings.loss_downscales}: {FAMILY_NAMES[family]} has no cross-attention "
                            f"at those downscales; SD1.5 has 1, 2, 4 (and 8 in the middle), SDXL 2 and 4.")
    unet = model.model.diffusion_model
    to_k = {key: unet.get_submodule(cross_attention_path(unet, key)).to_k for key in layers}
    probes = AttentionProbes(to_k, optimized_attention, detach_reference=settings.detach_reference)
    patched = model.clone()
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    if any(key.key in existing for key in layers):
        log.warning("The model already replaces attention on some loss layers; the trainer's "
                    "probes take their place during training.")
    patched.set_model_attn2_patch(ValuesContextPatch())
    for key in layers:
        patched.set_model_attn2_replace(probes.replace_patch(key), *key.key)
    return patched, probes


def model_extra_conds(patched, pooled: torch.Tensor | None, size: tuple[int, int], device) -> dict[str, torch.Tensor]:
    """The model's own extra conditioning (SDXL: pooled text + size embedding 'y'); empty for SD1.5."""
    kwargs = {"width": size[1], "height": size[0], "device": device}
    if pooled is not None:
        kwargs["pooled_output"] = pooled
    conds = patched.model.extra_conds(**kwargs)
    unsupported = set(conds) - {"y"}
    if unsupported:
        raise TrainingError(f"This model needs extra inputs {sorted(unsupported)} (an inpainting or edit model?); "
                            f"train on a plain SD1.5 or SDXL checkpoint.")
    return {name: cond.cond for name, cond in conds.items()}


@dataclass(frozen=True)
class Precision:
    autocast: torch.dtype | None  # torch.autocast to this dtype around the model, or None
    loss_scaling: bool  # some part computes in float16: scale the loss so that gradients do not underflow


def model_compute_dtype(patched) -> torch.dtype:
    """The dtype ComfyUI's apply_model casts the latent and the context to (so the dtype the token
    vectors' gradients pass through): the manual-cast dtype, including one a clone set, else the weights'."""
    return patched.get_model_object("manual_cast_dtype") or patched.model.get_dtype()


def bfloat16_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _can_set_compute_dtype(patched) -> bool:
    # set_model_compute_dtype (weights cast layer by layer) is newer than the late-2024 core
    return hasattr(patched, "set_model_compute_dtype")


def training_precision(name: str, patched, device: torch.device) -> Precision:
    """What training_dtype means for this model on this device. Call before the model is loaded: it
    may change the clone's compute dtype.

    apply_model casts the context to the UNet's compute dtype whatever autocast does, so a float16
    model puts float16 tensors on the token vectors' gradient path even under bfloat16 autocast: the
    loss is scaled whenever float16 is computed (autocast or compute dtype). The text encoders are
    not a case: ComfyUI's return their embeddings in float32 and their manual-cast layers follow it.
    ``auto`` is bfloat16 where the GPU has it and the model can compute in it (float32 or bfloat16
    weights, or a ComfyUI that casts float16 weights per layer), else the model's own dtype.
    """
    compute = model_compute_dtype(patched)
    settable = _can_set_compute_dtype(patched)
    if name == "auto":
        bfloat16_fits = compute != torch.float16 or settable
        name = "bfloat16" if bfloat16_available(device) and bfloat16_fits else "the model's own"
    autocast = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name)
    wanted = None
    if name == "bfloat16" and compute == torch.float16:
        wanted = torch.bfloat16
    elif name == "float32" and compute != torch.float32:
        wanted = torch.float32
    if wanted is not None and settable:
        patched.set_model_compute_dtype(wanted)
        compute = wanted
    elif wanted is not None:
        log.warning("This ComfyUI cannot make a %s model compute in %s; its latent and context stay %s%s.",
                    compute, wanted, compute, ", so the loss is scaled" if compute == torch.float16 else "")
    return Precision(autocast, torch.float16 in (autocast, compute))
