"""The face dataset an ID encoder trains on: WebDataset tar shards of identities, plus an index. Writer and reader.

A dataset folder (what ``scripts/prepare_faces.py`` writes) holds:

- ``faces-000000.tar``, ``faces-000001.tar``, ...: the shards. One WebDataset sample is one identity with all its
  usable photos, so every read can draw a reference and a different target photo of one person. A sample's files
  (``<key>.<extension>``; the key is ``id-`` and the identity's position in the dataset's identity list):

  ============================  ===========================================================================
  ``json``                      identity, photos (source files relative to the dataset root), embedding space,
                                face boxes in the source photos and in the training crops, the crop boxes
  ``embeddings.npy``            float32 [N, D] unit-length face embeddings (D: the embedding space's width)
  ``0000.png``, ``0001.png``..  the training crops, uint8 RGB at the training resolution (or ``.jpg``)
  ``latents.npy``               VAE latents of the crops [N, C, h, w] as ComfyUI's VAE encodes them (unscaled)
  ``clip.npy``                  float16 [N, 257, 1280] CLIP vision penultimate features of the aligned faces
  ============================  ===========================================================================

  Arrays are ``.npy`` files read with ``allow_pickle=False``: a shard never carries code.
- ``index.json``: what the dataset holds and how it was made (see :func:`build_index`), with ``index_hash``.
- ``clip_unconditional.safetensors``: the CLIP features [1, 257, 1280] of the unconditional image, when CLIP
  features were computed.
- ``parts/faces-000000.json``...: what each finished shard holds; merged into ``index.json`` once all are there.

Shards are written to a temporary name and renamed when complete (``models/files.py``); a shard counts as finished
when both it and its part file exist. Shards are byte-for-byte reproducible (fixed tar metadata).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import TrainingError
from ..files import atomic_save_safetensors, atomic_write, atomic_write_text, read_safetensors

log = logging.getLogger("idfuse.training")

FORMAT_NAME = "idfuse-face-shards"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
PARTS_FOLDER = "parts"
CLIP_UNCONDITIONAL_FILE = "clip_unconditional.safetensors"
CLIP_UNCONDITIONAL_KEY = "clip_hidden_uncond"
IMAGE_FORMATS = ("png", "jpg")
JPEG_QUALITY = 95
_SHARD_PATTERN = re.compile(r"^faces-(\d{6})\.tar$")
_PHOTO_FILE = re.compile(r"^(\d{4})\.(png|jpg)$")


@dataclass
class IdentitySample:
    """One identity with its usable photos: what one WebDataset sample holds."""

    identity: str
    photos: list[str]  # source file of each photo (relative to the dataset root)
    face_embeddings: torch.Tensor  # float32 [N, D] (D: the embedding space's width)
    embedding_space: str  # a name of models.faces.types.EMBEDDING_SPACES
    images: torch.Tensor | None  # uint8 [N, H, W, 3] training crops at the training resolution, or None
    latents: torch.Tensor | None  # float16/32 [N, C, h, w] VAE latents of the crops, or None
    clip_hidden: torch.Tensor | None  # float16 [N, 257, 1280] CLIP vision penultimate features of the aligned face
    face_boxes: torch.Tensor | None = None  # float32 [N, 4] x1, y1, x2, y2 of the face in the source photo
    crop_boxes: torch.Tensor | None = None  # float32 [N, 4] the training crop's square in the source photo
    crop_face_boxes: torch.Tensor | None = None  # float32 [N, 4] the face box in the training crop's pixels
    key: str = ""  # the WebDataset key (``id-<position in the dataset's identity list>``)

    def __len__(self) -> int:
        return len(self.photos)


# --- names -------------------------------------------------------------------------------------------------


def shard_name(index: int) -> str:
    return f"faces-{index:06d}.tar"


def part_path(dataset_dir: str | os.PathLike, index: int) -> Path:
    return Path(dataset_dir) / PARTS_FOLDER / f"faces-{index:06d}.json"


def sample_key(identity_position: int) -> str:
    """The WebDataset key of the identity at this position of the dataset's identity list (no dots: WebDataset
    splits a file name into key and extension at the first one)."""
    return f"id-{identity_position:08d}"


def shard_paths(dataset_dir: str | os.PathLike) -> list[Path]:
    """The finished shards of a dataset folder, sorted (temporary files of shards being written are not listed)."""
    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise TrainingError(f"Face dataset folder {folder} does not exist; run scripts/prepare_faces.py first.")
    return sorted(path for path in folder.iterdir() if _SHARD_PATTERN.match(path.name) and path.is_file())


def is_finished(dataset_dir: str | os.PathLike, index: int) -> bool:
    """Whether shard ``index`` was completely written (the shard, then its part file)."""
    return (Path(dataset_dir) / shard_name(index)).is_file() and part_path(dataset_dir, index).is_file()


# --- samples <-> bytes -------------------------------------------------------------------------------------


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _npy_array(data: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as error:
        raise TrainingError(f"{what} is not a readable .npy array ({error}); prepare the shard again.") from error


def _image_bytes(crop: np.ndarray, image_format: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(crop).save(buffer, format="PNG", compress_level=6)
    else:
        Image.fromarray(crop).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def _image_array(data: bytes, what: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except OSError as error:
        raise TrainingError(f"{what} is not a readable image ({error}); prepare the shard again.") from error


def _boxes_list(boxes: torch.Tensor | None) -> list[list[float]] | None:
    return None if boxes is None else [[float(v) for v in row] for row in boxes.tolist()]


def encode_sample(sample: IdentitySample, image_format: str = "png") -> dict[str, bytes | str]:
    """An IdentitySample as the files of one WebDataset sample (``__key__`` and extension -> bytes)."""
    if image_format not in IMAGE_FORMATS:
        raise TrainingError(f"Unknown image format '{image_format}'; use one of {', '.join(IMAGE_FORMATS)}.")
    count = len(sample.photos)
    if count == 0 or sample.face_embeddings.shape[0] != count:
        raise TrainingError(f"Identity {sample.identity}: {sample.face_embeddings.shape[0]} embeddings for "
                            f"{count} photos.")
    meta = {"identity": sample.identity, "photos": list(sample.photos), "embedding_space": sample.embedding_space,
            "face_boxes": _boxes_list(sample.face_boxes), "crop_boxes": _boxes_list(sample.crop_boxes),
            "crop_face_boxes": _boxes_list(sample.crop_face_boxes)}
    files: dict[str, bytes | str] = {
        "__key__": sample.key,
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
        "embeddings.npy": _npy_bytes(sample.face_embeddings.detach().cpu().to(torch.float32).numpy()),
    }
    if sample.images is not None:
        for i, crop in enumerate(sample.images.detach().cpu().to(torch.uint8).numpy()):
            files[f"{i:04d}.{image_format}"] = _image_bytes(crop, image_format)
    if sample.latents is not None:
        files["latents.npy"] = _npy_bytes(sample.latents.detach().cpu().numpy())
    if sample.clip_hidden is not None:
        files["clip.npy"] = _npy_bytes(sample.clip_hidden.detach().cpu().to(torch.float16).numpy())
    return files


def _tensor(values: list | None) -> torch.Tensor | None:
    return None if values is None else torch.tensor(values, dtype=torch.float32).reshape(-1, 4)


def decode_sample(files: Mapping[str, object]) -> IdentitySample:
    """One WebDataset sample (extension -> bytes, as ``webdataset.WebDataset`` yields it undecoded) -> IdentitySample.
    Usable as the ``map`` of a trainer's own WebDataset pipeline."""
    key = str(files.get("__key__", ""))
    where = f"Sample {key} of {files.get('__url__', 'a face shard')}"
    if "json" not in files or "embeddings.npy" not in files:
        raise TrainingError(f"{where} lacks its json or embeddings.npy: not an IDFuse face shard "
                            f"(format {FORMAT_NAME}); prepare it with scripts/prepare_faces.py.")
    meta = json.loads(bytes(files["json"]).decode("utf-8"))
    embeddings = torch.from_numpy(_npy_array(bytes(files["embeddings.npy"]), f"{where}: embeddings.npy").copy())
    photo_files = sorted((int(m.group(1)), name) for name in files if (m := _PHOTO_FILE.match(name)))
    images = None
    if photo_files:
        images = torch.from_numpy(np.stack([_image_array(bytes(files[name]), f"{where}: {name}")
                                            for _, name in photo_files]))
    latents = clip = None
    if "latents.npy" in files:
        latents = torch.from_numpy(_npy_array(bytes(files["latents.npy"]), f"{where}: latents.npy").copy())
    if "clip.npy" in files:
        clip = torch.from_numpy(_npy_array(bytes(files["clip.npy"]), f"{where}: clip.npy").copy())
    return IdentitySample(identity=meta["identity"], photos=list(meta["photos"]), face_embeddings=embeddings,
                          embedding_space=meta["embedding_space"], images=images, latents=latents, clip_hidden=clip,
                          face_boxes=_tensor(meta.get("face_boxes")), crop_boxes=_tensor(meta.get("crop_boxes")),
                          crop_face_boxes=_tensor(meta.get("crop_face_boxes")), key=key)


# --- shards ------------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: str | os.PathLike, samples: Iterable[IdentitySample], image_format: str = "png") -> str:
    """Write the samples as one tar shard, atomically (a temporary file, renamed when complete); returns its
    sha256. Fixed tar metadata: the same samples always give the same bytes."""
    import webdataset

    def write(temporary: str) -> None:
        with open(temporary, "wb") as file, webdataset.TarWriter(file, encoder=False, mtime=0.0, user="idfuse",
                                                                 group="idfuse") as writer:
            for sample in samples:
                writer.write(encode_sample(sample, image_format))

    written = atomic_write(path, write)
    return file_sha256(written)


def _every_shard(urls):
    return urls


def iterate_shard(path: str | os.PathLike) -> Iterator[IdentitySample]:
    """The samples of one shard, in order, in any process. WebDataset's default pipeline refuses to run under
    torch.distributed without a node splitter; here each process reads the shard it needs itself (the trainer's
    plan splits the samples, not the shards)."""
    import webdataset

    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"Face shard {path} does not exist; run scripts/prepare_faces.py for its dataset.")
    dataset = webdataset.WebDataset(str(path), shardshuffle=False, empty_check=False, nodesplitter=_every_shard,
                                    workersplitter=_every_shard)
    for files in dataset:
        yield decode_sample(files)


# --- the index ---------------------------------------------------------------------------------------------


def write_part(dataset_dir: str | os.PathLike, index: int, part: Mapping) -> Path:
    """What finished shard ``index`` holds (its identities, photos, skips, sha256), beside the shards."""
    return atomic_write_text(part_path(dataset_dir, index), json.dumps(part, indent=1, sort_keys=True,
                                                                         ensure_ascii=False))


def read_part(dataset_dir: str | os.PathLike, index: int) -> dict:
    path = part_path(dataset_dir, index)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TrainingError(f"Shard part file {path} is unreadable ({error}); delete it and its shard, then run "
                            f"scripts/prepare_faces.py again to redo that shard.") from error


def index_hash(index: Mapping) -> str:
    """sha256 of the index's canonical JSON without ``index_hash`` itself (it covers every shard's sha256)."""
    content = {key: value for key, value in index.items() if key != "index_hash"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def build_index(parts: list[Mapping], header: Mapping) -> dict:
    """index.json from the parts of every shard (in shard order) and the dataset's header (format-independent facts:
    embedding space, backend, resolution, what features are present and from which files, settings, skipped
    identities found while listing the input)."""
    identities, skipped_photos, skipped_identities, shards = [], [], list(header.get("skipped_identities", [])), []
    for part in parts:
        shards.append({"name": part["shard"], "identities": len(part["identities"]),
                       "photos": sum(item["photos"] for item in part["identities"]), "sha256": part["sha256"]})
        identities += [{"name": item["name"], "shard": part["shard"], "photos": item["photos"]}
                       for item in part["identities"]]
        skipped_photos += part["skipped_photos"]
        skipped_identities += part["skipped_identities"]
    index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **{k: v for k, v in header.items()
                                                                   if k != "skipped_identities"},
             "total_identities": len(identities), "total_photos": sum(item["photos"] for item in identities),
             "shards": shards, "identities": identities, "skipped_photos": skipped_photos,
             "skipped_identities": sorted(skipped_identities, key=lambda item: item["name"])}
    index["index_hash"] = index_hash(index)
    return index


def merge_index(dataset_dir: str | os.PathLike, header: Mapping, shard_count: int) -> dict | None:
    """Write index.json when every one of the ``shard_count`` shards is finished, and return it; None while some are
    missing. Safe when several processes finish at once: each writes the same content atomically."""
    missing = [i for i in range(shard_count) if not is_finished(dataset_dir, i)]
    if missing:
        log.info("Index not written yet: %d of %d shards unfinished (first: %s)", len(missing), shard_count,
                 shard_name(missing[0]))
        return None
    parts = [read_part(dataset_dir, i) for i in range(shard_count)]
    index = build_index(parts, header)
    atomic_write_text(Path(dataset_dir) / INDEX_FILE, json.dumps(index, indent=1, ensure_ascii=False))
    log.info("Wrote %s: %d identities, %d photos in %d shards (index hash %s)", Path(dataset_dir) / INDEX_FILE,
             index["total_identities"], index["total_photos"], shard_count, index["index_hash"][:12])
    return index


def read_index(dataset_dir: str | os.PathLike) -> dict:
    """The dataset's index.json, checked to be this format and version and unchanged since it was written."""
    path = Path(dataset_dir) / INDEX_FILE
    if not path.is_file():
        raise TrainingError(f"{path} does not exist: the dataset is not prepared, or not all of its shards are "
                            f"finished; run scripts/prepare_faces.py (with --merge-index once every shard is done).")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TrainingError(f"{path} is unreadable ({error}); run scripts/prepare_faces.py --merge-index.") from error
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise TrainingError(f"{path} is not an IDFuse face dataset index (format {FORMAT_NAME}); prepare the "
                            f"dataset with scripts/prepare_faces.py.")
    if index.get("version") != FORMAT_VERSION:
        raise TrainingError(f"{path} has format version {index.get('version')}; this IDFuse reads version "
                            f"{FORMAT_VERSION}. Prepare the dataset again with this version's scripts/prepare_faces.py.")
    if index.get("index_hash") != index_hash(index):
        raise TrainingError(f"{path} was changed after it was written (its index_hash no longer matches); run "
                            f"scripts/prepare_faces.py --merge-index to write it again.")
    return index


# --- CLIP features of the unconditional image --------------------------------------------------------------


def save_clip_unconditional(dataset_dir: str | os.PathLike, features: torch.Tensor) -> Path:
    return atomic_save_safetensors({CLIP_UNCONDITIONAL_KEY: features.detach().cpu().to(torch.float32).contiguous()},
                                   Path(dataset_dir) / CLIP_UNCONDITIONAL_FILE, {"format": FORMAT_NAME})


def clip_unconditional(dataset_dir: str | os.PathLike) -> torch.Tensor | None:
    """CLIP features [1, 257, 1280] of the unconditional image (nodes/glue/clip_vision.clip_vision_unconditional),
    saved once per dataset when CLIP features were computed; None otherwise."""
    path = Path(dataset_dir) / CLIP_UNCONDITIONAL_FILE
    if not path.is_file():
        return None
    tensors, _ = read_safetensors(path, TrainingError, "CLIP unconditional features")
    if CLIP_UNCONDITIONAL_KEY not in tensors:
        raise TrainingError(f"{path} lacks '{CLIP_UNCONDITIONAL_KEY}'; run scripts/prepare_faces.py again with "
                            f"--clip-vision.")
    return tensors[CLIP_UNCONDITIONAL_KEY]
