"""Validation images of an ID encoder during training: held-out identities sampled with the pack's own Infinite-ID
inference (the patched two-stream model and ``TwoStreamGuider``, ComfyUI's sampling), a grid of identities x
prompts, and each image's identity score when a face backend is given (``models.faces.scoring``, the Identity
Score node's code).

Every cell starts from the same noise (one seed), so two validations of one run differ only by the encoder's
weights. The encoder is sampled as it is (no copy): it is wrapped in a ModelPatcher whose load and offload
devices are the device it trains on, so ComfyUI's model management never moves it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import torch

from ...models.encoders import IDEncoder
from ...models.errors import IDFuseInputError
from ...models.faces.scoring import reference_from_embedding, score_images
from ...models.faces.types import FaceBackend, FaceEmbedding
from ...models.infinite_id.settings import InfiniteIDSettings
from .id_encoders import LoadedIDEncoder
from .infinite_id import TwoStreamGuider, prepared_model

log = logging.getLogger("idfuse.training")

DEFAULT_CFG = 5.0
DEFAULT_SAMPLER = "euler"
DEFAULT_SCHEDULER = "normal"


def loaded_encoder(encoder: IDEncoder, name: str = "training") -> LoadedIDEncoder:
    """The ID_ENCODER value of an encoder in memory, as IDFuse Load ID Encoder makes it for a file."""
    device = next(encoder.parameters()).device
    patcher = comfy.model_patcher.ModelPatcher(encoder, load_device=device, offload_device=device)
    return LoadedIDEncoder(patcher, encoder, name)


def reference_embedding(face_embedding: torch.Tensor, embedding_space: str, clip_hidden: torch.Tensor | None = None,
                        clip_uncond: torch.Tensor | None = None, backend: str = "") -> FaceEmbedding:
    """The ID_EMBEDS of one photo's prepared face: its embedding [D] (or [1, D]), CLIP features [257, 1280] (or
    [1, 257, 1280]) and the dataset's CLIP features of the unconditional image, as IDFuse Face Embed would give."""
    face = face_embedding.reshape(1, -1).float()
    face = torch.nn.functional.normalize(face, dim=-1)
    clip = None if clip_hidden is None else clip_hidden.reshape(1, *clip_hidden.shape[-2:]).float()
    uncond = None if clip_uncond is None else clip_uncond.reshape(1, *clip_uncond.shape[-2:]).float()
    return FaceEmbedding(arcface=face, clip_hidden=clip, per_photo_arcface=face.clone(), boxes=torch.zeros(1, 4),
                         keypoints=torch.zeros(1, 5, 2), embedding_space=embedding_space, clip_hidden_uncond=uncond,
                         backend=backend)


def sample_reference(sample, photo: int = 0, clip_uncond: torch.Tensor | None = None) -> FaceEmbedding:
    """The ID_EMBEDS of photo ``photo`` of a prepared identity (``models.training.face_shards.IdentitySample``)."""
    clip = None if sample.clip_hidden is None else sample.clip_hidden[photo]
    return reference_embedding(sample.face_embeddings[photo], sample.embedding_space, clip, clip_uncond,
                               f"prepared photo {sample.photos[photo]} of {sample.identity}")


def _conditioning(clip, prompt: str) -> list:
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def validation_grid(model, clip, vae, encoder: IDEncoder, references: Sequence[FaceEmbedding], prompts: Sequence[str],
                    seed: int, steps: int = 4, size: int = 256, backend: FaceBackend | None = None,
                    cfg: float = DEFAULT_CFG, negative_prompt: str = "",
                    settings: InfiniteIDSettings | None = None) -> tuple[torch.Tensor, list[float] | None]:
    """One image per (reference, prompt), sampled with Infinite-ID (ID stream), in a grid [1, R*size, P*size, 3]
    (rows: references, columns: prompts), and with ``backend`` the identity score (cosine similarity of the best
    face, 0 without a face) of each image against its reference, row by row; None without a backend.

    model / clip / vae: ComfyUI's (the frozen checkpoint's). The encoder is used as it is (eval, no gradients).
    """
    if not references or not prompts:
        raise IDFuseInputError(f"Validation needs at least one reference and one prompt; got {len(references)} "
                               f"reference(s) and {len(prompts)} prompt(s).")
    if size % 8 or size <= 0:
        raise IDFuseInputError(f"Validation image size must be a positive multiple of 8, got {size}.")
    settings = settings or InfiniteIDSettings()
    loaded = loaded_encoder(encoder)
    was_training = encoder.training
    encoder.eval()
    rows, scores = [], [] if backend is not None else None
    try:
        with torch.inference_mode():
            negative = _conditioning(clip, negative_prompt)
            positives = [_conditioning(clip, prompt) for prompt in prompts]
            for reference in references:
                patched = prepared_model(model, loaded, reference, settings)
                empty = torch.zeros(1, 4, size // 8, size // 8)
                latent = comfy.sample.fix_empty_latent_channels(patched, empty)
                noise = comfy.sample.prepare_noise(latent, seed)
                sigmas = comfy.samplers.KSampler(patched, steps=steps, device=patched.load_device,
                                                 sampler=DEFAULT_SAMPLER, scheduler=DEFAULT_SCHEDULER, denoise=1.0,
                                                 model_options=patched.model_options).sigmas
                images = []
                for positive in positives:
                    guider = TwoStreamGuider(patched)
                    guider.set_conds(positive, negative)
                    guider.set_cfg(cfg)
                    samples = guider.sample(noise, latent, comfy.samplers.sampler_object(DEFAULT_SAMPLER), sigmas,
                                            disable_pbar=True, seed=seed)
                    samples = samples.to(comfy.model_management.intermediate_device())
                    images.append(vae.decode(samples)[:1].float().cpu())
                row = torch.cat(images)  # [P, H, W, 3]
                if backend is not None:
                    batch, _photos = score_images(backend, row, reference_from_embedding(backend, reference, "held out"))
                    scores.extend(score.similarity for score in batch.scores)
                rows.append(torch.cat(list(row), dim=1))  # [H, P*W, 3]
    finally:
        encoder.train(was_training)
    grid = torch.cat(rows, dim=0)[None]
    log.info("Validation: %d identities x %d prompts, %d steps at %d px%s", len(references), len(prompts), steps,
             size, "" if scores is None else f", identity score mean {sum(scores) / len(scores):.3f}")
    return grid, scores
