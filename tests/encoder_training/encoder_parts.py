"""Small parts of the encoder-training tests: narrow IDFuse encoders for the small UNets of
tests/support/factories.py, fixed (reference, target) pair batches, and the training module around them."""

from __future__ import annotations

import torch

LATENT = 8  # 8x8 latents (64 px crops): every cross-attention layer still runs
CLIP_TOKENS, CLIP_WIDTH = 257, 1280
FACE_WIDTH = 512


def small_encoder(denoiser, seed: int = 0):
    """A narrow IDFuse encoder (4 face + 4 CLIP tokens, one perceiver layer) for the denoiser's model."""
    from comfyui_idfuse.models.encoders.kinds.idfuse import create_idfuse_encoder

    torch.manual_seed(seed)
    return create_idfuse_encoder(denoiser.family, denoiser.hidden_sizes, num_face_tokens=4, num_clip_tokens=4,
                                 face_hidden_dim=64, clip_mapper_dim=64, clip_mapper_depth=1, ff_mult=2)


def clip_uncond() -> torch.Tensor:
    return torch.full((1, CLIP_TOKENS, CLIP_WIDTH), 0.5)


def pair_batch(size: int = 2, seed: int = 0, first_id: int = 0, context_dim: int = 768, with_prompts: bool = False):
    from comfyui_idfuse.models.training.encoder_trainer import PairBatch

    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randn(size, 77, context_dim, generator=gen) if with_prompts else None
    pooled = torch.randn(size, 1280, generator=gen) if with_prompts and context_dim == 2048 else None
    return PairBatch(sample_ids=torch.arange(first_id, first_id + size),
                     reference_faces=torch.nn.functional.normalize(torch.randn(size, FACE_WIDTH, generator=gen), dim=1),
                     reference_clip=torch.randn(size, CLIP_TOKENS, CLIP_WIDTH, generator=gen),
                     target_latents=torch.randn(size, 4, LATENT, LATENT, generator=gen),
                     prompts_context=prompts, prompts_pooled=pooled)


def make_training(model, **changes):
    """(EncoderTraining, TrainingDenoiser) for ``model`` with settings ``changes``."""
    from comfyui_idfuse.models.training.encoder_settings import EncoderTrainingSettings
    from comfyui_idfuse.models.training.encoder_trainer import EncoderTraining
    from comfyui_idfuse.nodes.glue.encoder_training import training_denoiser

    settings = EncoderTrainingSettings(**changes)
    denoiser = training_denoiser(model, settings)
    return EncoderTraining(small_encoder(denoiser), denoiser, settings, clip_uncond()), denoiser
