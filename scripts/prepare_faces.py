"""Face photos -> the WebDataset shards an IDFuse ID encoder trains on (models/training/face_shards.py).

    python scripts/prepare_faces.py PHOTOS --out DATASET [options]
    accelerate launch --multi_gpu --num_processes 4 scripts/prepare_faces.py PHOTOS --out DATASET [options]
    python scripts/prepare_faces.py PHOTOS --out DATASET --shard 0 --num-shards 2   (and --shard 1 elsewhere)

PHOTOS is a folder per identity (``PHOTOS/<identity>/*.jpg``, the VGGFace2 / CelebA layout) or a JSONL manifest
(one ``{"image": "<path>", "identity": "<name>"}`` a line; paths relative to the manifest's folder or --image-root).

For every photo: detect the faces (dlib by default, insightface with --backend insightface), take the largest (or
skip photos with several, --on-several-faces skip), skip faces smaller than --min-face-size, embed it, and keep the
training crop: a square of the photo centred on the face, sized so the face box's longer side is --face-share of it
(smaller when the photo is too small for that: never padded, never squashed), resized to --resolution. Optionally the
CLIP vision penultimate features of the ArcFace-aligned 224 crop (--clip-vision, through ComfyUI's loader) and the VAE
latents of the training crop (--vae). Identities with fewer than 2 usable photos are skipped. Everything skipped is in
index.json with its reason; a broken image is reported and skipped, never a crash.

Sharding: identities are sorted by name and cut into shards of --identities-per-shard; process i of n writes the
shards k with k mod n == i (--shard i --num-shards n, else RANK/WORLD_SIZE or LOCAL_RANK/LOCAL_WORLD_SIZE as
accelerate and torchrun set them). So the shards depend only on the identities and --identities-per-shard, never on
the number of processes. Finished shards are skipped (resumable); the process that finishes last writes index.json
(--merge-index writes it alone).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import host
import numpy as np
import torch

host.pack()  # before the pack's imports: comfyui_idfuse.models without ComfyUI
from comfyui_idfuse.models import faces as face_backends  # noqa: E402
from comfyui_idfuse.models.errors import FaceAnalysisError, IDFuseError, IDFuseInputError  # noqa: E402
from comfyui_idfuse.models.faces.embed import CLIP_CROP_SIZE  # noqa: E402
from comfyui_idfuse.models.faces.types import EMBEDDING_SPACES, FaceBackend, FaceBackendBase  # noqa: E402
from comfyui_idfuse.models.files import atomic_write_text  # noqa: E402
from comfyui_idfuse.models.training import face_shards  # noqa: E402
from comfyui_idfuse.models.training.face_crops import DEFAULT_FACE_SHARE, face_crop  # noqa: E402

log = logging.getLogger("idfuse.training")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
SEVERAL_FACES_ACTIONS = ("largest", "skip")
MIN_PHOTOS_PER_IDENTITY = 2  # a reference and a different target photo
DEFAULT_RESOLUTION = 512
# The face box (brows to chin, cheek to cheek) takes this share of the crop's side: a head-and-shoulders portrait,
# with room for hair and the neck, which is how most prompts frame a person.
DEFAULT_MIN_FACE_SIZE = 64
DEFAULT_IDENTITIES_PER_SHARD = 64
DEFAULT_BATCH_SIZE = 8  # crops per VAE / CLIP call
SETTINGS_FILE = "settings.json"  # in parts/: the header every process of one dataset must agree on
RANK_VARIABLES = (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE"))

# Features of crops: float RGB [K, H, W, 3] in 0..1 -> a tensor [K, ...].
CropEncoder = Callable[[torch.Tensor], torch.Tensor]


# --- the input -----------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """The photos of every identity, identities sorted by name; photos relative to ``root``."""

    root: Path
    layout: str  # "folders" or "manifest"
    identities: list[tuple[str, list[str]]]

    @property
    def photo_count(self) -> int:
        return sum(len(photos) for _, photos in self.identities)

    def listing_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identities, ensure_ascii=False).encode("utf-8")).hexdigest()


def list_folders(root: Path) -> Dataset:
    identities = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        photos = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if photos:
            identities.append((folder.name, [f"{folder.name}/{name}" for name in photos]))
    return Dataset(root, "folders", identities)


def list_manifest(manifest: Path, image_root: Path | None) -> Dataset:
    root = image_root or manifest.parent
    by_identity: dict[str, list[str]] = {}
    with open(manifest, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                image, identity = str(entry["image"]), str(entry["identity"])
            except (ValueError, KeyError, TypeError) as error:
                raise IDFuseInputError(f"{manifest} line {number}: expected a JSON object with \"image\" and "
                                       f"\"identity\" ({type(error).__name__}: {error}); fix or remove that line."
                                       ) from error
            path = Path(image)
            if path.is_absolute() and path.is_relative_to(root):
                path = path.relative_to(root)
            by_identity.setdefault(identity, []).append(path.as_posix())
    return Dataset(root, "manifest", sorted(by_identity.items()))


def list_dataset(source: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Dataset:
    """The identities and photos of a folder per identity or of a JSONL manifest; raises IDFuseInputError."""
    path = Path(source)
    if not path.exists():
        raise IDFuseInputError(f"The photos input {path} does not exist; give a folder with a subfolder per identity "
                               f"or a .jsonl manifest.")
    if image_root is not None and not Path(image_root).is_dir():
        raise IDFuseInputError(f"--image-root {image_root} is not a folder.")
    if path.is_dir():
        dataset = list_folders(path)
        expected = f"photos in subfolders of {path} (one per identity: {path}/<identity>/*.jpg)"
    else:
        dataset = list_manifest(path, Path(image_root) if image_root else None)
        expected = f"lines in the manifest {path}"
    if not dataset.identities:
        raise IDFuseInputError(f"The dataset is empty: no {expected}.")
    return dataset


# --- settings ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepSettings:
    """Everything that changes what a shard holds (recorded in the index; a resumed run must use the same)."""

    backend: str = "dlib"
    face_model: str = ""
    det_size: int = 640
    min_face_size: int = DEFAULT_MIN_FACE_SIZE
    on_several_faces: str = "largest"
    resolution: int = DEFAULT_RESOLUTION
    face_share: float = DEFAULT_FACE_SHARE
    images: bool = True
    image_format: str = "png"
    identities_per_shard: int = DEFAULT_IDENTITIES_PER_SHARD
    clip_vision: str | None = None  # file name of the CLIP vision model, when features are computed
    vae: str | None = None  # file name of the VAE / checkpoint, when latents are computed
    latent_dtype: str = "float16"

    def check(self) -> None:
        if self.on_several_faces not in SEVERAL_FACES_ACTIONS:
            raise IDFuseInputError(f"--on-several-faces {self.on_several_faces}: use one of "
                                   f"{', '.join(SEVERAL_FACES_ACTIONS)}.")
        if self.resolution < 64 or self.resolution % 64:
            raise IDFuseInputError(f"--resolution {self.resolution}: use a multiple of 64 (512 for SD1.5, 1024 for "
                                   f"SDXL).")
        if not 0.05 <= self.face_share <= 1.0:
            raise IDFuseInputError(f"--face-share {self.face_share}: use a share between 0.05 and 1 (0.4: a "
                                   f"head-and-shoulders portrait).")
        if self.identities_per_shard < 1 or self.min_face_size < 1:
            raise IDFuseInputError("--identities-per-shard and --min-face-size must be at least 1.")
        if self.image_format not in face_shards.IMAGE_FORMATS:
            raise IDFuseInputError(f"--image-format {self.image_format}: use one of "
                                   f"{', '.join(face_shards.IMAGE_FORMATS)}.")
        if not self.images and not self.vae:
            raise IDFuseInputError("--no-images needs --vae: training needs the crops or their latents.")
        if self.latent_dtype not in ("float16", "float32"):
            raise IDFuseInputError(f"--latent-dtype {self.latent_dtype}: use float16 or float32.")


def backend_names() -> dict[str, type[FaceBackendBase]]:
    """--backend choices: each kind of models.faces.BACKENDS by its short name (DlibBackend -> dlib)."""
    return {kind.__name__.removesuffix("Backend").lower(): kind for kind in face_backends.BACKENDS}


def backend_kind(name: str) -> type[FaceBackendBase]:
    kinds = backend_names()
    if name not in kinds:
        raise IDFuseInputError(f"Unknown face backend '{name}'; use --backend {' or '.join(kinds)}.")
    return kinds[name]


def face_model_name(kind: type[FaceBackendBase], asked: str) -> str:
    """The model name of ``kind`` that ``asked`` names (exactly, or a unique part of it such as 'cnn'); the kind's
    first (default) model when nothing is asked."""
    names = kind.model_names()
    if not asked:
        return face_backends.RECOMMENDED_PACK if face_backends.RECOMMENDED_PACK in names else names[0]
    if asked in names:
        return asked
    matches = [name for name in names if asked.lower() in name.lower()]
    if len(matches) != 1:
        raise IDFuseInputError(f"--face-model {asked}: use one of {'; '.join(names)}.")
    return matches[0]


def load_backend(settings: PrepSettings, insightface_roots: Sequence[str], provider: str) -> FaceBackend:
    kind = backend_kind(settings.backend)
    missing = kind.missing_dependencies()
    if missing:
        raise IDFuseInputError(f"--backend {settings.backend} cannot run here: {missing}")
    if kind.model_folder and not insightface_roots:
        raise IDFuseInputError(f"--backend {settings.backend} needs --insightface-root: the folder holding "
                               f"models/<model pack>/ (e.g. ComfyUI/models/insightface).")
    model = face_model_name(kind, settings.face_model)
    return kind.load(model, list(insightface_roots) if kind.model_folder else [], provider, settings.det_size)


# --- one photo ---------------------------------------------------------------------------------------------


@dataclass
class PreparedPhoto:
    photo: str
    embedding: np.ndarray  # [D] float32
    face_box: np.ndarray  # [4] in the photo
    crop: np.ndarray  # uint8 [R, R, 3]
    crop_box: np.ndarray  # [4] the crop's square in the photo
    crop_face_box: np.ndarray  # [4] the face in the crop's pixels
    aligned: np.ndarray | None  # uint8 [224, 224, 3] the ArcFace-aligned face, for CLIP


@dataclass
class Skipped:
    photo: str
    identity: str
    reason: str


def read_photo(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        return np.array(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)


def training_crop(rgb: np.ndarray, face_box: Sequence[float], resolution: int, face_share: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The square training crop centred on the face (``models.training.face_crops``, shared with the identity
    trainer's photo folders): the crop, its square in the photo and the face box in the crop's pixels."""
    crop = face_crop(torch.from_numpy(np.ascontiguousarray(rgb)), face_box, resolution, face_share)
    return crop.pixels.numpy(), np.array(crop.square.box, np.float32), np.array(crop.face_box, np.float32)


def prepare_photo(backend: FaceBackend, root: Path, photo: str, identity: str, settings: PrepSettings,
                  with_aligned: bool) -> PreparedPhoto | Skipped:
    """Detect, choose, check, embed and crop one photo; anything wrong with it is a Skipped with its reason."""
    try:
        rgb = read_photo(root / photo)
    except Exception as error:  # noqa: BLE001  (any decoder failure: the photo is reported and skipped)
        return Skipped(photo, identity, f"unreadable: {type(error).__name__}: {error}")
    try:
        faces = backend.detect(rgb)
        if len(faces) == 0:
            return Skipped(photo, identity, "no face")
        if len(faces) > 1 and settings.on_several_faces == "skip":
            return Skipped(photo, identity, f"several faces ({len(faces)})")
        face = faces[faces.largest()]
        x1, y1, x2, y2 = (float(v) for v in face.box)
        size = min(x2 - x1, y2 - y1)
        if size < settings.min_face_size:
            return Skipped(photo, identity, f"too small: face {size:.0f} px, under --min-face-size "
                                            f"{settings.min_face_size}")
        if face.keypoints is None:
            return Skipped(photo, identity, f"no keypoints from {backend.name}, which alignment needs")
        embedding = np.asarray(backend.embed(rgb, face), dtype=np.float32)
        aligned = backend.align(rgb, face.keypoints, CLIP_CROP_SIZE) if with_aligned else None
    except FaceAnalysisError as error:
        return Skipped(photo, identity, f"face analysis failed: {error}")
    crop, crop_box, crop_face = training_crop(rgb, face.box, settings.resolution, settings.face_share)
    return PreparedPhoto(photo, embedding, np.asarray(face.box, np.float32), crop, crop_box, crop_face, aligned)


# --- features of the crops -----------------------------------------------------------------------------------


@dataclass
class Features:
    """The optional encoders of the crops, and what the index says about them."""

    latents: CropEncoder | None = None  # training crops -> VAE latents [K, C, h, w]
    clip: CropEncoder | None = None  # aligned 224 crops -> penultimate hidden states [K, 257, 1280]
    clip_unconditional: torch.Tensor | None = None  # [1, 257, 1280]
    batch_size: int = DEFAULT_BATCH_SIZE


def in_batches(encoder: CropEncoder, crops: list[np.ndarray], batch_size: int) -> torch.Tensor:
    outputs = []
    for start in range(0, len(crops), batch_size):
        pixels = torch.from_numpy(np.stack(crops[start:start + batch_size])).float() / 255.0
        with torch.no_grad():
            outputs.append(encoder(pixels).detach().to("cpu"))
    return torch.cat(outputs)


def comfy_latent_encoder(vae) -> CropEncoder:
    """ComfyUI's VAE -> crops to latents as ComfyUI's VAE Encode node gives them (unscaled): the mean of the VAE's
    latent distribution, as current ComfyUI returns it (older cores drew a sample from it, from the global random
    state: cached latents would then differ from run to run and between processes)."""
    regularizer = getattr(getattr(vae, "first_stage_model", None), "regularization", None)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        if regularizer is None or not hasattr(regularizer, "sample"):
            return vae.encode(pixels[..., :3])
        sampled = regularizer.sample
        regularizer.sample = False
        try:
            return vae.encode(pixels[..., :3])
        finally:
            regularizer.sample = sampled

    return encode


def load_comfy_vae(path: str):
    """A VAE file, or the VAE of a checkpoint, through ComfyUI's loader."""
    import comfy.sd
    import comfy.utils

    state = comfy.utils.load_torch_file(path)
    checkpoint_prefix = "first_stage_model."
    if any(key.startswith(checkpoint_prefix) for key in state):
        state = comfy.utils.state_dict_prefix_replace(state, {checkpoint_prefix: ""}, filter_keys=True)
    if not state:
        raise IDFuseInputError(f"--vae {path}: no VAE weights in it; give a VAE file or an SD1.5/SDXL checkpoint.")
    try:
        return comfy.sd.VAE(sd=state)
    except Exception as error:  # noqa: BLE001  (ComfyUI raises plain errors for a file it cannot build)
        raise IDFuseInputError(f"--vae {path}: ComfyUI could not build a VAE from it ({error}).") from error


def comfy_clip_features(clip_vision) -> tuple[CropEncoder, torch.Tensor]:
    """ComfyUI CLIP_VISION -> the crop encoder and the unconditional features (the pack's own glue)."""
    from comfyui_idfuse.nodes.glue.clip_vision import clip_vision_penultimate, clip_vision_unconditional

    return ((lambda crops: clip_vision_penultimate(clip_vision, crops).to(torch.float16)),
            clip_vision_unconditional(clip_vision).to("cpu", torch.float32))


def load_comfy_clip_vision(path: str):
    import comfy.clip_vision

    try:
        model = comfy.clip_vision.load(path)
    except Exception as error:  # noqa: BLE001  (ComfyUI raises plain errors for a file it cannot read)
        raise IDFuseInputError(f"--clip-vision {path}: ComfyUI could not load it ({error}).") from error
    if model is None:
        raise IDFuseInputError(f"--clip-vision {path}: ComfyUI does not recognise it as a CLIP vision model; use "
                               f"the ViT-H/14 file FaceID-Plus uses (CLIP-ViT-H-14-laion2B-s32B-b79K).")
    return model


def open_clip_features(weights: str, model_name: str) -> tuple[CropEncoder, torch.Tensor]:
    """open_clip's vision tower from a local weights file: the penultimate block's hidden states of the crops
    (normalised with the model's own mean and std), and those of the all-zero normalised image."""
    try:
        import open_clip
    except ImportError as error:
        raise IDFuseInputError(f"--open-clip needs the open_clip package, which cannot be imported ({error}): "
                               f"`pip install open_clip_torch`, or use --clip-vision with a ComfyUI CLIP vision "
                               f"file.") from error
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights)
    visual = model.visual.eval()
    normalise = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
    mean = torch.tensor(normalise.mean).view(1, 3, 1, 1)
    std = torch.tensor(normalise.std).view(1, 3, 1, 1)
    captured: list[torch.Tensor] = []
    # The input of the last block is the penultimate hidden state (what ComfyUI's penultimate_hidden_states is).
    visual.transformer.resblocks[-1].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))

    def hidden(normalised: torch.Tensor) -> torch.Tensor:
        captured.clear()
        with torch.no_grad():
            visual(normalised)
        states = captured[0]
        return (states if states.shape[0] == normalised.shape[0] else states.transpose(0, 1)).float()

    def encoder(crops: torch.Tensor) -> torch.Tensor:
        return hidden((crops.movedim(-1, 1) - mean) / std).to(torch.float16)

    return encoder, hidden(torch.zeros(1, 3, CLIP_CROP_SIZE, CLIP_CROP_SIZE))


# --- shards ------------------------------------------------------------------------------------------------


@dataclass
class ShardPlan:
    """Which identities (positions in the sorted list) go into which shard: only the identities and
    --identities-per-shard decide, not the number of processes."""

    dataset: Dataset
    identities_per_shard: int
    shards: list[range] = field(init=False)

    def __post_init__(self) -> None:
        count = len(self.dataset.identities)
        self.shards = [range(start, min(start + self.identities_per_shard, count))
                       for start in range(0, count, self.identities_per_shard)]

    def for_process(self, rank: int, world: int) -> list[int]:
        return list(range(rank, len(self.shards), world))


def process_slot(shard: int | None, num_shards: int | None, environ: Mapping[str, str] | None = None
                 ) -> tuple[int, int]:
    """(this process, number of processes): --shard/--num-shards, else the launcher's rank variables, else (0, 1)."""
    if shard is not None or num_shards is not None:
        if shard is None or num_shards is None or not 0 <= shard < num_shards:
            raise IDFuseInputError(f"--shard {shard} --num-shards {num_shards}: give both, with 0 <= --shard < "
                                   f"--num-shards.")
        return shard, num_shards
    env = os.environ if environ is None else environ
    for rank_name, world_name in RANK_VARIABLES:
        if rank_name in env and world_name in env:
            rank, world = int(env[rank_name]), int(env[world_name])
            if not 0 <= rank < world:
                raise IDFuseInputError(f"{rank_name}={rank} is not below {world_name}={world}.")
            return rank, world
    return 0, 1


def header(settings: PrepSettings, backend: FaceBackend, dataset: Dataset, source: str | os.PathLike,
           features: Features) -> dict:
    space = backend.embedding_space
    known = EMBEDDING_SPACES.get(space)
    return {
        "embedding_space": space, "embedding_width": known.width if known else None, "backend": backend.name,
        "resolution": settings.resolution, "face_share": settings.face_share,
        # The input's name (not its path: the same photos elsewhere make the same dataset) and what it lists, so that
        # a resumed run over changed photos is refused instead of mixing old and new shards.
        "input": {"name": Path(source).name, "layout": dataset.layout, "identities": len(dataset.identities),
                  "photos": dataset.photo_count, "listing_sha256": dataset.listing_hash()},
        "images": {"present": settings.images, "format": settings.image_format if settings.images else None},
        "latents": {"present": features.latents is not None, "from": settings.vae,
                    "dtype": settings.latent_dtype if features.latents is not None else None},
        "clip": {"present": features.clip is not None, "from": settings.clip_vision,
                 "unconditional": face_shards.CLIP_UNCONDITIONAL_FILE if features.clip is not None else None},
        "min_photos_per_identity": MIN_PHOTOS_PER_IDENTITY,
        "shard_count": None,  # filled in by prepare()
        "settings": asdict(settings),
    }


def check_settings(out: Path, dataset_header: dict) -> None:
    """The first process records the header; a later or resumed one with other settings is refused (its shards would
    not fit the finished ones)."""
    path = out / face_shards.PARTS_FOLDER / SETTINGS_FILE
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded != dataset_header:
            differ = sorted(key for key in set(recorded) | set(dataset_header)
                            if recorded.get(key) != dataset_header.get(key))
            raise IDFuseInputError(f"{out} was prepared with other settings ({', '.join(differ)} differ; see {path}). "
                                   f"Use the same settings to resume, or a new --out folder.")
        return
    atomic_write_text(path, json.dumps(dataset_header, indent=1, sort_keys=True, ensure_ascii=False))


def identity_sample(position: int, name: str, photos: list[PreparedPhoto], space: str, settings: PrepSettings,
                    features: Features) -> face_shards.IdentitySample:
    latents = clip = None
    if features.latents is not None:
        latents = in_batches(features.latents, [p.crop for p in photos], features.batch_size)
        latents = latents.to(getattr(torch, settings.latent_dtype))
    if features.clip is not None:
        clip = in_batches(features.clip, [p.aligned for p in photos], features.batch_size).to(torch.float16)
    return face_shards.IdentitySample(
        identity=name, photos=[p.photo for p in photos],
        face_embeddings=torch.from_numpy(np.stack([p.embedding for p in photos])), embedding_space=space,
        images=torch.from_numpy(np.stack([p.crop for p in photos])) if settings.images else None,
        latents=latents, clip_hidden=clip, face_boxes=torch.from_numpy(np.stack([p.face_box for p in photos])),
        crop_boxes=torch.from_numpy(np.stack([p.crop_box for p in photos])),
        crop_face_boxes=torch.from_numpy(np.stack([p.crop_face_box for p in photos])),
        key=face_shards.sample_key(position))


def write_one_shard(out: Path, shard: int, positions: range, dataset: Dataset, backend: FaceBackend,
                    settings: PrepSettings, features: Features, progress) -> dict:
    part: dict = {"shard": face_shards.shard_name(shard), "identities": [], "skipped_photos": [],
                  "skipped_identities": []}

    def samples() -> Iterator[face_shards.IdentitySample]:
        for position in positions:
            name, photos = dataset.identities[position]
            usable = []
            for photo in photos:
                result = prepare_photo(backend, dataset.root, photo, name, settings, features.clip is not None)
                progress.update(1)
                if isinstance(result, Skipped):
                    log.warning("Skipped %s: %s", photo, result.reason)
                    part["skipped_photos"].append(asdict(result))
                else:
                    usable.append(result)
            if len(usable) < MIN_PHOTOS_PER_IDENTITY:
                part["skipped_identities"].append({"name": name, "photos": len(usable), "reason": (
                    f"fewer than {MIN_PHOTOS_PER_IDENTITY} usable photos ({len(usable)} of {len(photos)})")})
                log.warning("Skipped identity %s: %d usable photo(s) of %d", name, len(usable), len(photos))
                continue
            part["identities"].append({"name": name, "photos": len(usable)})
            yield identity_sample(position, name, usable, backend.embedding_space, settings, features)

    part["sha256"] = face_shards.write_shard(out / part["shard"], samples(), settings.image_format)
    face_shards.write_part(out, shard, part)
    log.info("Shard %s: %d identities, %d photos, %d photos and %d identities skipped", part["shard"],
             len(part["identities"]), sum(i["photos"] for i in part["identities"]), len(part["skipped_photos"]),
             len(part["skipped_identities"]))
    return part


def prepare(source: str | os.PathLike, out: str | os.PathLike, settings: PrepSettings, backend: FaceBackend,
            features: Features | None = None, rank: int = 0, world: int = 1, image_root: str | None = None
            ) -> dict | None:
    """Write this process's unfinished shards, then index.json if every shard is finished (returned; else None)."""
    from tqdm import tqdm

    settings.check()
    features = features or Features()
    out = Path(out)
    dataset = list_dataset(source, image_root)
    plan = ShardPlan(dataset, settings.identities_per_shard)
    dataset_header = header(settings, backend, dataset, source, features)
    dataset_header["shard_count"] = len(plan.shards)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, dataset_header)
    if features.clip_unconditional is not None:
        face_shards.save_clip_unconditional(out, features.clip_unconditional)
    mine = plan.for_process(rank, world)
    todo = [shard for shard in mine if not face_shards.is_finished(out, shard)]
    log.info("%d identities, %d photos in %d shards; process %d of %d: %d shards, %d already finished",
             len(dataset.identities), dataset.photo_count, len(plan.shards), rank, world, len(mine),
             len(mine) - len(todo))
    photos = sum(len(dataset.identities[p][1]) for shard in todo for p in plan.shards[shard])
    with tqdm(total=photos, unit="photo", desc=f"faces (process {rank})", disable=None) as progress:
        for shard in todo:
            write_one_shard(out, shard, plan.shards[shard], dataset, backend, settings, features, progress)
    return face_shards.merge_index(out, dataset_header, len(plan.shards))


def merge_only(out: str | os.PathLike) -> dict:
    """--merge-index: index.json from the recorded settings and the finished shards; names the missing ones."""
    out = Path(out)
    path = out / face_shards.PARTS_FOLDER / SETTINGS_FILE
    if not path.is_file():
        raise IDFuseInputError(f"{out} holds no prepared shards ({path} is missing); run prepare_faces.py first.")
    dataset_header = json.loads(path.read_text(encoding="utf-8"))
    count = int(dataset_header["shard_count"])
    missing = [face_shards.shard_name(i) for i in range(count) if not face_shards.is_finished(out, i)]
    if missing:
        raise IDFuseInputError(f"{len(missing)} of {count} shards of {out} are not finished ({', '.join(missing[:5])}"
                               f"{' ...' if len(missing) > 5 else ''}); run prepare_faces.py again for them.")
    return face_shards.merge_index(out, dataset_header, count)


# --- command line ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prepare_faces.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", nargs="?", help="folder with a subfolder per identity, or a JSONL manifest")
    parser.add_argument("--out", required=True, help="dataset folder to write (shards, index.json)")
    parser.add_argument("--image-root", help="manifest only: folder its image paths are relative to "
                                             "(default: the manifest's folder)")
    faces = parser.add_argument_group("faces")
    faces.add_argument("--backend", default="dlib", help=f"face backend: {', '.join(backend_names())} (default dlib)")
    faces.add_argument("--face-model", default="", help="model of the backend (default: dlib HOG / buffalo_l; a "
                                                        "unique part of the name is enough, e.g. cnn)")
    faces.add_argument("--insightface-root", action="append", default=[],
                       help="insightface: folder holding models/<pack>/ (repeatable)")
    faces.add_argument("--provider", default="CPU", help="execution provider of the backend (CPU, CUDA)")
    faces.add_argument("--det-size", type=int, default=640, help="detection size (default 640)")
    faces.add_argument("--min-face-size", type=int, default=DEFAULT_MIN_FACE_SIZE,
                       help=f"skip faces whose box is smaller (px, default {DEFAULT_MIN_FACE_SIZE})")
    faces.add_argument("--on-several-faces", default="largest", choices=SEVERAL_FACES_ACTIONS,
                       help="photo with several faces: use the largest (default) or skip the photo")
    crops = parser.add_argument_group("training crops and features")
    crops.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION,
                       help=f"side of the square training crop (default {DEFAULT_RESOLUTION}; 1024 for SDXL)")
    crops.add_argument("--face-share", type=float, default=DEFAULT_FACE_SHARE,
                       help=f"face box's longer side as a share of the crop's side (default {DEFAULT_FACE_SHARE})")
    crops.add_argument("--no-images", action="store_true", help="do not store the crops (latents only)")
    crops.add_argument("--image-format", default="png", choices=face_shards.IMAGE_FORMATS,
                       help="crops as lossless png (default) or jpg (quality 95, about 5x smaller)")
    crops.add_argument("--clip-vision", help="ComfyUI CLIP vision file (ViT-H/14): store CLIP features of the faces")
    crops.add_argument("--open-clip", help="open_clip weights file instead of --clip-vision (needs open_clip)")
    crops.add_argument("--open-clip-model", default="ViT-H-14", help="open_clip model of --open-clip")
    crops.add_argument("--vae", help="VAE file or SD checkpoint: store the VAE latents of the crops")
    crops.add_argument("--latent-dtype", default="float16", choices=("float16", "float32"))
    crops.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="crops per VAE / CLIP call")
    crops.add_argument("--comfyui", help="ComfyUI folder for --clip-vision / --vae (default: COMFYUI_PATH, or the "
                                         "ComfyUI the pack is installed in)")
    crops.add_argument("--cpu", action="store_true", help="run ComfyUI's models on the CPU")
    shards = parser.add_argument_group("shards")
    shards.add_argument("--identities-per-shard", type=int, default=DEFAULT_IDENTITIES_PER_SHARD)
    shards.add_argument("--shard", type=int, help="this process's number i (0-based) of --num-shards: it writes "
                                                  "the shards k with k mod n == i (default: RANK / LOCAL_RANK)")
    shards.add_argument("--num-shards", type=int, help="number n of processes sharing the work")
    shards.add_argument("--merge-index", action="store_true", help="only write index.json from finished shards")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    args = parser.parse_args(argv)
    if not args.merge_index and not args.photos:
        parser.error("the photos folder or manifest is required (except with --merge-index)")
    if args.clip_vision and args.open_clip:
        parser.error("give --clip-vision or --open-clip, not both")
    return args


def settings_from(args: argparse.Namespace) -> PrepSettings:
    clip_file = args.clip_vision or args.open_clip
    return PrepSettings(backend=args.backend, face_model=args.face_model, det_size=args.det_size,
                        min_face_size=args.min_face_size, on_several_faces=args.on_several_faces,
                        resolution=args.resolution, face_share=args.face_share, images=not args.no_images,
                        image_format=args.image_format, identities_per_shard=args.identities_per_shard,
                        clip_vision=Path(clip_file).name if clip_file else None,
                        vae=Path(args.vae).name if args.vae else None, latent_dtype=args.latent_dtype)


def features_from(args: argparse.Namespace, local_rank: int) -> Features:
    features = Features(batch_size=max(1, args.batch_size))
    for flag, path in (("--clip-vision", args.clip_vision), ("--open-clip", args.open_clip), ("--vae", args.vae)):
        if path and not Path(path).is_file():
            raise IDFuseInputError(f"{flag} {path} does not exist.")
    if args.open_clip:
        features.clip, features.clip_unconditional = open_clip_features(args.open_clip, args.open_clip_model)
    if args.clip_vision or args.vae:
        if torch.cuda.is_available() and not args.cpu:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())  # one GPU per process under accelerate
        host.comfy(args.comfyui, cpu=True if args.cpu else None)
    if args.clip_vision:
        features.clip, features.clip_unconditional = comfy_clip_features(load_comfy_clip_vision(args.clip_vision))
    if args.vae:
        features.latents = comfy_latent_encoder(load_comfy_vae(args.vae))
    return features


def main(argv: Sequence[str] | None = None, configure_logging: bool = True) -> int:
    """The command line; returns the exit code (2 after an error, which is logged). ``configure_logging`` False
    leaves the logging set-up to the caller (a test)."""
    args = parse_args(argv)
    if configure_logging:
        logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("idfuse").setLevel(args.log_level)  # also where the host configured the root logger
    try:
        if args.merge_index:
            merge_only(args.out)
            return 0
        settings = settings_from(args)
        settings.check()
        rank, world = process_slot(args.shard, args.num_shards)
        backend = load_backend(settings, args.insightface_root, args.provider)
        features = features_from(args, int(os.environ.get("LOCAL_RANK", rank)))
        index = prepare(args.photos, args.out, settings, backend, features, rank, world, args.image_root)
    except IDFuseError as error:
        log.error("%s", error)
        return 2
    if index is None:
        log.info("This process's shards are finished; index.json is written by the last process to finish "
                 "(or run with --merge-index)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
