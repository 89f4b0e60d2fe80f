"""Tiny inputs of the encoder-training script: an SD1.5 checkpoint FILE that ComfyUI's own loader (``comfy.sd.load_checkpoint_guess_config``) reads, for
running the training script end to end in seconds.

The file holds the tests' small SD1.5 UNet (``factories.make_model``: every cross-attention layer at its real place,
32 channels), written with ComfyUI's own ``comfy.sd.save_checkpoint``; no text encoder and no VAE (the test
datasets carry latents, text attention is off). ComfyUI's model detection knows SD1.5 by its 320 channels, so
:func:`register_tiny_models` adds a model config for the 32-channel UNet (an SD1.5 config in every other respect)
to ``comfy.supported_models.models``, in the process that loads the file.

As a launcher (what the subprocess tests run)::

    python tests/support/tiny_checkpoint.py scripts/train_id_encoder.py [args...]
    accelerate launch --multi_gpu --num_processes 2 tests/support/tiny_checkpoint.py scripts/train_id_encoder.py ...

registers the tiny config, then hands over to ``script_launcher`` (ComfyUI set up as in the tests, the script run
as ``__main__``).

:func:`write_tiny_dataset` writes a prepared face dataset with ``models.training.face_shards``' own writer (shards,
part files, index.json, the unconditional CLIP features) from synthetic identities: random unit face embeddings,
CLIP features and latents, so no face detection is needed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SUPPORT_DIR = os.path.dirname(os.path.abspath(__file__))
TINY_MODEL_CHANNELS = 32  # factories.SD15_UNET["model_channels"]


def register_tiny_models() -> None:
    """Let ComfyUI's model detection recognise the tests' 32-channel SD1.5 UNet. Idempotent."""
    import comfy.supported_models as supported

    if any(getattr(config, "idfuse_tiny", False) for config in supported.models):
        return

    class TinySD15(supported.SD15):
        idfuse_tiny = True
        unet_config = {**supported.SD15.unet_config, "model_channels": TINY_MODEL_CHANNELS}

        def clip_target(self, state_dict=None):
            return None  # the tiny file has no text encoder

    supported.models.insert(0, TinySD15)


def unregister_tiny_models() -> None:
    """Undo :func:`register_tiny_models` (in-process tests leave ComfyUI's model list as they found it)."""
    import comfy.supported_models as supported

    supported.models[:] = [config for config in supported.models if not getattr(config, "idfuse_tiny", False)]


def write_tiny_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """The tests' small SD1.5 UNet (``factories.make_model("sd15", seed=seed)``) as a checkpoint file."""
    import comfy.sd
    from factories import make_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.sd.save_checkpoint(str(path), make_model("sd15", seed=seed))
    return path


def synthetic_identity(position: int, photos: int, embedding_space: str = "dlib-resnet-128", width: int = 128,
                       latent_size: int = 8, seed: int = 0):
    """A face_shards.IdentitySample of random features: what prepare_faces.py would write for ``photos`` photos."""
    import torch

    from comfyui_idfuse.models.training import face_shards

    gen = torch.Generator().manual_seed(seed * 100_003 + position)
    faces = torch.nn.functional.normalize(torch.randn(photos, width, generator=gen), dim=-1)
    return face_shards.IdentitySample(
        identity=f"person_{position:03d}", photos=[f"person_{position:03d}/{i}.jpg" for i in range(photos)],
        face_embeddings=faces, embedding_space=embedding_space, images=None,
        latents=torch.randn(photos, 4, latent_size, latent_size, generator=gen),
        clip_hidden=torch.randn(photos, 257, 1280, generator=gen).to(torch.float16),
        key=face_shards.sample_key(position))


def write_tiny_dataset(out: str | os.PathLike, photos_per_identity: list[list[int]], seed: int = 0,
                       embedding_space: str = "dlib-resnet-128", width: int = 128, latent_size: int = 8) -> Path:
    """A prepared dataset: shard ``i`` holds one identity per entry of ``photos_per_identity[i]`` with that many
    photos; latents ``latent_size``² (resolution 8 × that)."""
    import torch

    from comfyui_idfuse.models.training import face_shards

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    position = 0
    for shard, counts in enumerate(photos_per_identity):
        samples = []
        for count in counts:
            samples.append(synthetic_identity(position, count, embedding_space, width, latent_size, seed))
            position += 1
        part = {"shard": face_shards.shard_name(shard), "skipped_photos": [], "skipped_identities": [],
                "identities": [{"name": s.identity, "photos": len(s)} for s in samples]}
        part["sha256"] = face_shards.write_shard(out / part["shard"], samples)
        face_shards.write_part(out, shard, part)
    gen = torch.Generator().manual_seed(seed + 7)
    face_shards.save_clip_unconditional(out, torch.randn(1, 257, 1280, generator=gen))
    header = {"embedding_space": embedding_space, "embedding_width": width, "backend": "synthetic",
              "resolution": latent_size * 8, "latents": {"present": True}, "clip": {"present": True},
              "shard_count": len(photos_per_identity)}
    face_shards.merge_index(out, header, len(photos_per_identity))
    return out


def main(argv: list[str]) -> None:
    if SUPPORT_DIR not in sys.path:
        sys.path.insert(0, SUPPORT_DIR)
    import comfy_env
    import script_launcher

    comfy_env.setup_comfy()
    register_tiny_models()
    script_launcher.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
