"""Validation images of an ID encoder under training: each cell of the grid is what the pack's own Infinite-ID
sampler makes for that reference and prompt, the grid is reproducible, the encoder and model are left as they
were, and with a face backend each image is scored against its reference with the Identity Score's code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import make_clip, make_model, tiny_vae

from comfyui_idfuse.models.encoders import create_idfuse_encoder
from comfyui_idfuse.models.errors import IDFuseInputError
from comfyui_idfuse.models.faces.scoring import reference_from_embedding, score_photo
from comfyui_idfuse.models.faces.types import DLIB_RESNET_128, DetectedFaces
from comfyui_idfuse.nodes.glue.encoder_validation import (
    loaded_encoder,
    reference_embedding,
    sample_reference,
    validation_grid,
)
from comfyui_idfuse.nodes.glue.model_info import cross_attention_widths
from comfyui_idfuse.nodes.infinite_id import IDFuseInfiniteIDSampler

SIZE = 64  # latents 8x8: enough for the small UNet's three downsamplings
STEPS = 2
PROMPTS = ["a photo of a person", "a person in a garden"]
NODE_SETTINGS = {"id_weight": 1.0, "id_start_percent": 0.0, "id_end_percent": 1.0, "mixing": True,
                 "mix_blocks": "all", "mix_start_percent": 0.0, "mix_end_percent": 1.0, "adain": "mean",
                 "encoder_lora_strength": 0.0}


class PixelBackend:
    """A face backend finding one face (the whole image) whose vector is the image's downscaled pixels: different
    images get different vectors, so the scores show which image was compared with which reference."""

    name = "pixels"
    embedding_space = DLIB_RESNET_128

    def detect(self, rgb: np.ndarray) -> DetectedFaces:
        h, w = rgb.shape[:2]
        points = np.array([[0.3 * w, 0.4 * h], [0.7 * w, 0.4 * h], [0.5 * w, 0.6 * h], [0.35 * w, 0.8 * h],
                           [0.65 * w, 0.8 * h]])
        return DetectedFaces.left_to_right(np.array([[0, 0, w, h]]), np.array([1.0]), points[None])

    def align(self, rgb: np.ndarray, keypoints: np.ndarray, size: int) -> np.ndarray:
        return rgb

    def embed(self, rgb: np.ndarray, face) -> np.ndarray:
        small = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(rgb).permute(2, 0, 1).float(), (4, 4))
        vector = torch.cat([small.flatten(), torch.zeros(128 - 48)]) - 127.0
        return (vector / vector.norm()).numpy()


@pytest.fixture(scope="module")
def parts(tokenizer_dir):
    model = make_model("sd15")
    encoder = create_idfuse_encoder("sd15", cross_attention_widths(model), num_clip_tokens=2, face_hidden_dim=32,
                                    clip_mapper_depth=1, embedding_space=DLIB_RESNET_128)
    gen = torch.Generator().manual_seed(5)
    uncond = torch.randn(257, 1280, generator=gen)
    references = [reference_embedding(torch.randn(128, generator=gen), DLIB_RESNET_128,
                                      torch.randn(257, 1280, generator=gen), uncond) for _ in range(2)]
    return {"model": model, "clip": make_clip("sd15", tokenizer_dir), "vae": tiny_vae(), "encoder": encoder,
            "references": references}


def grid(parts, **options):
    return validation_grid(parts["model"], parts["clip"], parts["vae"], parts["encoder"], parts["references"],
                           PROMPTS, seed=7, steps=STEPS, size=SIZE, **options)


def node_image(parts, reference, prompt):
    """What IDFuse Infinite-ID Sampler + VAE Decode make for the same inputs."""
    clip = parts["clip"]
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    negative, pooled_negative = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    latent = {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)}
    with torch.inference_mode():
        ident, _text = IDFuseInfiniteIDSampler().sample(
            parts["model"], [[cond, {"pooled_output": pooled}]], [[negative, {"pooled_output": pooled_negative}]],
            loaded_encoder(parts["encoder"]), reference, latent, seed=7, steps=STEPS, cfg=5.0, sampler_name="euler",
            scheduler="normal", denoise=1.0, **NODE_SETTINGS)
        return parts["vae"].decode(ident["samples"])[0]


def test_each_cell_is_the_infinite_id_samplers_image(parts):
    image, scores = grid(parts)
    assert image.shape == (1, 2 * SIZE, 2 * SIZE, 3) and scores is None
    for row, reference in enumerate(parts["references"]):
        for column, prompt in enumerate(PROMPTS):
            cell = image[0, row * SIZE:(row + 1) * SIZE, column * SIZE:(column + 1) * SIZE]
            assert torch.allclose(cell, node_image(parts, reference, prompt), atol=1e-5), (row, column)
    cells = [image[0, r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE] for r in range(2) for c in range(2)]
    assert all(not torch.equal(a, b) for i, a in enumerate(cells) for b in cells[i + 1:])


def test_reproducible_and_leaves_encoder_and_model_as_they_were(parts):
    encoder, model = parts["encoder"], parts["model"]
    encoder.train()
    weights = {n: t.clone() for n, t in encoder.state_dict().items()}
    options = repr(model.model_options)
    first, _ = grid(parts)
    second, _ = grid(parts)
    assert torch.equal(first, second)
    assert encoder.training
    assert all(torch.equal(t, weights[n]) for n, t in encoder.state_dict().items())
    assert repr(model.model_options) == options and not model.patches


def test_scores_each_image_against_its_own_reference(parts):
    backend = PixelBackend()
    image, scores = grid(parts, backend=backend)
    expected = []
    for row, reference in enumerate(parts["references"]):
        for column in range(len(PROMPTS)):
            cell = image[0, row * SIZE:(row + 1) * SIZE, column * SIZE:(column + 1) * SIZE]
            rgb = (cell.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            expected.append(score_photo(backend, rgb, reference_from_embedding(backend, reference, "r")).similarity)
    assert len(scores) == 4
    assert scores == pytest.approx(expected, abs=1e-3)
    assert len(set(np.round(scores, 6))) == 4


def test_sample_reference_takes_the_photo_of_a_prepared_identity():
    class Sample:  # the fields of models.training.face_shards.IdentitySample it reads
        identity, photos, embedding_space = "ann", ["ann/1.jpg", "ann/2.jpg"], DLIB_RESNET_128
        face_embeddings = torch.randn(2, 128)
        clip_hidden = torch.randn(2, 257, 1280).half()

    uncond = torch.randn(1, 257, 1280)
    embedding = sample_reference(Sample, 1, uncond)
    assert torch.allclose(embedding.arcface[0], torch.nn.functional.normalize(Sample.face_embeddings[1], dim=0))
    assert torch.equal(embedding.clip_hidden[0], Sample.clip_hidden[1].float())
    assert torch.equal(embedding.clip_hidden_uncond, uncond) and embedding.embedding_space == DLIB_RESNET_128
    assert "ann/2.jpg" in embedding.backend


def test_refuses_an_empty_grid_and_a_bad_size(parts):
    with pytest.raises(IDFuseInputError, match="prompt"):
        validation_grid(parts["model"], parts["clip"], parts["vae"], parts["encoder"], parts["references"], [],
                        seed=0)
    with pytest.raises(IDFuseInputError, match="multiple of 8"):
        validation_grid(parts["model"], parts["clip"], parts["vae"], parts["encoder"], parts["references"],
                        PROMPTS, seed=0, size=60)
