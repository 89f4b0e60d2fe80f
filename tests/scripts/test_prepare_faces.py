"""scripts/prepare_faces.py and the shard format it writes (models/training/face_shards.py): both input layouts,
what is skipped and why, sharding independent of the number of processes, resuming, CLIP features and latents, and
the reader giving back exactly what was written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import prepare_faces as pf
import pytest
import torch

PACK_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = PACK_ROOT / "scripts" / "prepare_faces.py"
RESOLUTION = 128  # small crops keep the tests fast; the geometry does not depend on it


@pytest.fixture(scope="session")
def shards(pack):
    return pack.models.training.face_shards


@pytest.fixture(scope="session")
def errors(pack):
    return pack.models.errors


@pytest.fixture(scope="session")
def dlib_backend():
    return pf.load_backend(pf.PrepSettings(), [], "CPU")


class CountingBackend:
    """A backend that counts the photos it is asked to find faces in."""

    def __init__(self, backend):
        self.backend = backend
        self.detected = 0
        self.name, self.embedding_space = backend.name, backend.embedding_space

    def detect(self, rgb):
        self.detected += 1
        return self.backend.detect(rgb)

    def align(self, rgb, keypoints, size):
        return self.backend.align(rgb, keypoints, size)

    def embed(self, rgb, face):
        return self.backend.embed(rgb, face)


SETTINGS = pf.PrepSettings(resolution=RESOLUTION, identities_per_shard=1)


@pytest.fixture(scope="session")
def prepared(photo_folder, dlib_backend, tmp_path_factory):
    """The folder layout, one identity per shard: eileen, nobody (no usable photo: an empty shard), tom."""
    out = tmp_path_factory.mktemp("dataset")
    index = pf.prepare(photo_folder, out, SETTINGS, dlib_backend)
    return out, index


def all_samples(shards, dataset_dir):
    return [sample for path in shards.shard_paths(dataset_dir) for sample in shards.iterate_shard(path)]


def assert_same_samples(first, second):
    assert [s.identity for s in first] == [s.identity for s in second]
    for a, b in zip(first, second, strict=True):
        assert a.photos == b.photos and a.key == b.key and a.embedding_space == b.embedding_space
        for name in ("face_embeddings", "images", "latents", "clip_hidden", "face_boxes", "crop_boxes",
                     "crop_face_boxes"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            if x is not None:
                assert x.dtype == y.dtype and torch.equal(x, y), name


# --- the folder layout and what is skipped -----------------------------------------------------------------


def test_folder_layout_writes_an_identity_per_sample(prepared, shards):
    out, index = prepared
    samples = all_samples(shards, out)
    assert [s.identity for s in samples] == ["eileen", "tom"]
    eileen, tom = samples
    assert eileen.photos == ["eileen/front.jpg", "eileen/mirrored.png", "eileen/warm_crop.png"]
    assert tom.photos == ["tom/darker.png", "tom/mirrored.png", "tom/wall.png"]
    for sample in samples:
        count = len(sample.photos)
        assert sample.embedding_space == "dlib-resnet-128"
        assert sample.face_embeddings.shape == (count, 128) and sample.face_embeddings.dtype == torch.float32
        assert torch.allclose(sample.face_embeddings.norm(dim=1), torch.ones(count), atol=1e-5)
        assert sample.images.shape == (count, RESOLUTION, RESOLUTION, 3) and sample.images.dtype == torch.uint8
        assert sample.latents is None and sample.clip_hidden is None
    # Views of one person are closer to each other than to the other person (the embeddings are real).
    same = eileen.face_embeddings @ eileen.face_embeddings.T
    other = eileen.face_embeddings @ tom.face_embeddings.T
    assert same.min() > other.max()
    assert index == shards.read_index(out)
    assert index["identities"] == [{"name": "eileen", "shard": "faces-000000.tar", "photos": 3},
                                   {"name": "tom", "shard": "faces-000002.tar", "photos": 3}]
    assert index["total_photos"] == 6 and index["total_identities"] == 2 and index["shard_count"] == 3
    assert index["embedding_space"] == "dlib-resnet-128" and index["embedding_width"] == 128
    assert index["resolution"] == RESOLUTION and index["backend"].startswith("dlib HOG")
    assert index["images"] == {"present": True, "format": "png"}
    assert not index["latents"]["present"] and not index["clip"]["present"]
    assert shards.clip_unconditional(out) is None


def test_faceless_and_broken_photos_are_skipped_and_listed(prepared):
    _, index = prepared
    reasons = {item["photo"]: item["reason"] for item in index["skipped_photos"]}
    assert reasons["nobody/coffee.png"] == "no face" and reasons["nobody/cat.png"] == "no face"
    assert reasons["eileen/broken.jpg"].startswith("unreadable: ")
    assert len(reasons) == 3
    assert index["skipped_identities"] == [{"name": "nobody", "photos": 0,
                                            "reason": "fewer than 2 usable photos (0 of 2)"}]


def test_training_crops_frame_the_face(prepared, photo_folder, shards):
    """Square crops of the photo around the face: the face box's longer side is face_share of the crop's side, or
    more where the photo is too small for that (Tom's largest view: the crop is then the photo's shorter side)."""
    out, _ = prepared
    for sample in all_samples(shards, out):
        for photo, box, square, in_crop in zip(sample.photos, sample.face_boxes, sample.crop_boxes,
                                               sample.crop_face_boxes, strict=True):
            height, width = pf.read_photo(photo_folder / photo).shape[:2]
            longer = float(max(box[2] - box[0], box[3] - box[1]))
            side = float(square[2] - square[0])
            assert side == float(square[3] - square[1])  # square in the photo
            assert side == pytest.approx(min(longer / SETTINGS.face_share, width, height), abs=1)
            assert 0 <= square[0] and 0 <= square[1] and square[2] <= width and square[3] <= height
            assert float(max(in_crop[2] - in_crop[0], in_crop[3] - in_crop[1])) == pytest.approx(
                longer * RESOLUTION / side, abs=1e-3)


def test_manifest_layout_writes_the_same_samples(prepared, photo_folder, dlib_backend, shards, tmp_path):
    out, index = prepared
    manifest = tmp_path / "faces.jsonl"
    lines = [json.dumps({"image": str(path.relative_to(photo_folder)), "identity": path.parent.name})
             for path in sorted(photo_folder.glob("*/*"))]
    manifest.write_text("\n".join(lines[::-1]) + "\n\n", encoding="utf-8")  # any line order, blank lines ignored
    manifest_index = pf.prepare(manifest, tmp_path / "out", SETTINGS, dlib_backend, image_root=str(photo_folder))
    assert manifest_index["input"]["layout"] == "manifest"
    # The same photos give the same samples; the manifest keeps its own photo order within an identity.
    folder_samples = all_samples(shards, out)
    manifest_samples = all_samples(shards, tmp_path / "out")
    assert manifest_samples[0].photos == ["eileen/warm_crop.png", "eileen/mirrored.png", "eileen/front.jpg"]
    for sample in manifest_samples:
        order = sorted(range(len(sample.photos)), key=lambda i: sample.photos[i])
        for name in ("face_embeddings", "images", "face_boxes", "crop_boxes", "crop_face_boxes"):
            setattr(sample, name, getattr(sample, name)[order])
        sample.photos = sorted(sample.photos)
    assert_same_samples(folder_samples, manifest_samples)
    assert sorted(manifest_index["skipped_photos"], key=str) == sorted(index["skipped_photos"], key=str)
    assert manifest_index["skipped_identities"] == index["skipped_identities"]


# --- sharding and resuming -----------------------------------------------------------------------------------


def run_script(*args: str, env: dict | None = None) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                 "LOCAL_WORLD_SIZE")}
    environ.update(env or {})
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=environ, cwd=PACK_ROOT)


def test_two_processes_write_the_same_shards_as_one(prepared, photo_folder, shards, tmp_path):
    """Two processes started at once (ranks from the launcher's variables, as under accelerate launch) through the
    command line: byte-identical shards, the same index (whichever finished last wrote it)."""
    out, index = prepared
    args = [str(photo_folder), "--out", str(tmp_path), "--resolution", str(RESOLUTION), "--identities-per-shard", "1"]
    runs = [run_script(*args, env={"RANK": str(rank), "WORLD_SIZE": "2"}) for rank in (0, 1)]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
    assert [p.name for p in shards.shard_paths(tmp_path)] == [p.name for p in shards.shard_paths(out)]
    for mine, theirs in zip(shards.shard_paths(tmp_path), shards.shard_paths(out), strict=True):
        assert mine.read_bytes() == theirs.read_bytes()
    two = shards.read_index(tmp_path)
    assert two["index_hash"] == index["index_hash"] and two == index


def test_shard_assignment_depends_only_on_identities(photo_folder):
    plan = pf.ShardPlan(pf.list_dataset(photo_folder), 1)
    assert [list(r) for r in plan.shards] == [[0], [1], [2]]
    assert plan.for_process(0, 2) == [0, 2] and plan.for_process(1, 2) == [1] and plan.for_process(0, 1) == [0, 1, 2]
    assert [list(r) for r in pf.ShardPlan(pf.list_dataset(photo_folder), 2).shards] == [[0, 1], [2]]


def test_process_slot(errors):
    assert pf.process_slot(None, None, {}) == (0, 1)
    assert pf.process_slot(None, None, {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4)
    assert pf.process_slot(None, None, {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == (1, 2)
    assert pf.process_slot(1, 3, {"RANK": "0", "WORLD_SIZE": "2"}) == (1, 3)  # the flags win
    with pytest.raises(errors.IDFuseInputError, match="--shard"):
        pf.process_slot(3, 3, {})
    with pytest.raises(errors.IDFuseInputError, match="--shard"):
        pf.process_slot(1, None, {})


def test_resumed_prep_skips_finished_shards(prepared, dlib_backend, photo_folder, shards, tmp_path):
    out, index = prepared
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    # An interrupted run: tom's shard never finished (a temporary file left), index.json not yet written.
    (resumed / "faces-000002.tar").unlink()
    shards.part_path(resumed, 2).unlink()
    (resumed / "index.json").unlink()
    (resumed / ".faces-000002.tar.abcdefgh.tmp").write_bytes(b"half a shard")
    finished = {name: (resumed / name).stat().st_mtime_ns for name in ("faces-000000.tar", "faces-000001.tar")}
    counting = CountingBackend(dlib_backend)
    again = pf.prepare(photo_folder, resumed, SETTINGS, counting)
    assert counting.detected == 3  # tom's three photos, nothing of the finished shards
    assert {name: (resumed / name).stat().st_mtime_ns for name in finished} == finished
    assert again == index
    assert (resumed / "faces-000002.tar").read_bytes() == (out / "faces-000002.tar").read_bytes()
    counting.detected = 0
    assert pf.prepare(photo_folder, resumed, SETTINGS, counting) == index and counting.detected == 0


def test_resuming_with_other_settings_is_refused(prepared, photo_folder, dlib_backend, errors, tmp_path):
    out, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(errors.IDFuseInputError, match="other settings.*resolution"):
        pf.prepare(photo_folder, copy, pf.PrepSettings(resolution=256, identities_per_shard=1), dlib_backend)
    # The same photos elsewhere resume; a photo more is another input.
    photos = tmp_path / "elsewhere" / photo_folder.name
    shutil.copytree(photo_folder, photos)
    counting = CountingBackend(dlib_backend)
    pf.prepare(photos, copy, SETTINGS, counting)
    assert counting.detected == 0
    shutil.copy(photos / "tom" / "wall.png", photos / "tom" / "wall_again.png")
    with pytest.raises(errors.IDFuseInputError, match="other settings.*input"):
        pf.prepare(photos, copy, SETTINGS, counting)


def test_merge_index_step(prepared, shards, errors, tmp_path):
    out, index = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "index.json").unlink()
    assert pf.merge_only(copy) == index and shards.read_index(copy) == index
    shards.part_path(copy, 1).unlink()
    with pytest.raises(errors.IDFuseInputError, match="1 of 3 shards.*faces-000001.tar"):
        pf.merge_only(copy)


# --- face choice and size ------------------------------------------------------------------------------------


def test_several_faces_largest_or_skipped(two_faces_photo, dlib_backend, tmp_path):
    from conftest import save

    save(tmp_path / "photos" / "twins" / "a.png", two_faces_photo)
    save(tmp_path / "photos" / "twins" / "b.png", np.ascontiguousarray(two_faces_photo[:, ::-1]))
    settings = pf.PrepSettings(resolution=64, identities_per_shard=4)
    kept = pf.prepare(tmp_path / "photos", tmp_path / "largest", settings, dlib_backend)
    assert kept["total_photos"] == 2 and kept["skipped_photos"] == []
    skip = pf.PrepSettings(resolution=64, identities_per_shard=4, on_several_faces="skip")
    skipped = pf.prepare(tmp_path / "photos", tmp_path / "skip", skip, dlib_backend)
    assert [s["reason"] for s in skipped["skipped_photos"]] == ["several faces (2)"] * 2
    assert skipped["skipped_identities"][0]["name"] == "twins" and skipped["total_identities"] == 0


def test_faces_under_the_minimum_size_are_skipped(photo_folder, dlib_backend, tmp_path):
    settings = pf.PrepSettings(resolution=64, min_face_size=150, identities_per_shard=8)
    index = pf.prepare(photo_folder, tmp_path, settings, dlib_backend, rank=0, world=1)
    reasons = {s["photo"]: s["reason"] for s in index["skipped_photos"]}
    # Her face is about 100 px, Tom's 160-220 px (his smallest view, 200 px wide, has a 164 px box).
    assert all(reasons[f"eileen/{name}"].startswith("too small: face ") for name in
               ("front.jpg", "mirrored.png", "warm_crop.png"))
    assert "under --min-face-size 150" in reasons["eileen/front.jpg"]
    assert [i["name"] for i in index["identities"]] == ["tom"]


def test_training_crop_geometry():
    photo = np.zeros((300, 400, 3), np.uint8)
    photo[100:140, 180:220] = 255  # the "face": a 40 px white square
    crop, square, face = pf.training_crop(photo, (180, 100, 220, 140), 64, 0.25)
    assert crop.shape == (64, 64, 3)
    assert square.tolist() == [120, 40, 280, 200]  # 40 / 0.25 = 160 px, centred on the face
    assert np.allclose(face, [24, 24, 40, 40])
    assert crop[32, 32].tolist() == [255, 255, 255] and crop[5, 5].tolist() == [0, 0, 0]
    # Near the border: shifted inside the photo, not padded; larger than the photo: the photo's shorter side.
    _, square, face = pf.training_crop(photo, (0, 0, 40, 40), 64, 0.25)
    assert square.tolist() == [0, 0, 160, 160] and np.allclose(face, [0, 0, 16, 16])
    _, square, _ = pf.training_crop(photo, (180, 100, 220, 140), 64, 0.1)
    assert square.tolist() == [50, 0, 350, 300]


# --- CLIP features and latents ---------------------------------------------------------------------------------


def test_clip_features_and_latents(photo_folder, dlib_backend, shards, tmp_path):
    """ComfyUI's CLIP vision model and VAE (tiny, random) through the script's own glue: what is stored is what the
    models give for the stored crops."""
    from factories import tiny_vae
    from ip_adapter_files import random_clip_vision

    from comfyui_idfuse.nodes.glue.clip_vision import clip_vision_penultimate

    clip_vision, vae = random_clip_vision(), tiny_vae()
    clip_encoder, unconditional = pf.comfy_clip_features(clip_vision)
    features = pf.Features(latents=pf.comfy_latent_encoder(vae), clip=clip_encoder, clip_unconditional=unconditional,
                           batch_size=2)
    settings = pf.PrepSettings(resolution=64, identities_per_shard=8, clip_vision="clip.safetensors",
                               vae="vae.safetensors")
    source = tmp_path / "photos"
    shutil.copytree(photo_folder / "tom", source / "tom")
    index = pf.prepare(source, tmp_path / "out", settings, dlib_backend, features)
    assert index["clip"] == {"present": True, "from": "clip.safetensors",
                             "unconditional": "clip_unconditional.safetensors"}
    assert index["latents"] == {"present": True, "from": "vae.safetensors", "dtype": "float16"}
    (tom,) = all_samples(shards, tmp_path / "out")
    assert tom.latents.shape == (3, 4, 8, 8) and tom.latents.dtype == torch.float16
    # The mean of the latent distribution (as current ComfyUI encodes): the same latents every time.
    encode = pf.comfy_latent_encoder(vae)
    with torch.no_grad():
        expected = encode(tom.images.float() / 255.0)
        assert torch.equal(encode(tom.images.float() / 255.0), expected)
    assert torch.allclose(tom.latents.float(), expected, atol=2e-3 * expected.abs().max().item())
    assert tom.clip_hidden.shape == (3, 257, 1280) and tom.clip_hidden.dtype == torch.float16
    backend_photo = pf.read_photo(source / tom.photos[0])
    face = dlib_backend.detect(backend_photo)[0]
    aligned = torch.from_numpy(dlib_backend.align(backend_photo, face.keypoints, 224))[None].float() / 255.0
    assert torch.allclose(tom.clip_hidden[0].float(), clip_vision_penultimate(clip_vision, aligned)[0].float(),
                          atol=1e-2)
    stored = shards.clip_unconditional(tmp_path / "out")
    assert stored.shape == (1, 257, 1280) and torch.equal(stored, unconditional)


def test_open_clip_missing_is_a_clear_error(errors, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip then raises ImportError
    with pytest.raises(errors.IDFuseInputError, match="open_clip.*pip install open_clip_torch"):
        pf.open_clip_features("weights.bin", "ViT-H-14")


# --- the reader ----------------------------------------------------------------------------------------------


def synthetic_sample(shards, key: int, count: int = 3, latent_dtype=torch.float32):
    g = torch.Generator().manual_seed(key)
    return shards.IdentitySample(
        identity=f"person {key} é", photos=[f"p{key}/{i}.jpg" for i in range(count)],
        face_embeddings=torch.nn.functional.normalize(torch.randn(count, 512, generator=g), dim=1),
        embedding_space="arcface-w600k-512",
        images=torch.randint(0, 256, (count, 16, 16, 3), generator=g, dtype=torch.uint8),
        latents=torch.randn(count, 4, 2, 2, generator=g).to(latent_dtype),
        clip_hidden=torch.randn(count, 257, 1280, generator=g).to(torch.float16),
        face_boxes=torch.rand(count, 4, generator=g), crop_boxes=torch.rand(count, 4, generator=g),
        crop_face_boxes=torch.rand(count, 4, generator=g), key=shards.sample_key(key))


def test_reader_round_trips_exactly_what_was_written(shards, tmp_path):
    written = [synthetic_sample(shards, 0), synthetic_sample(shards, 7, 2, torch.float16)]
    written.append(shards.IdentitySample(identity="bare", photos=["a.png", "b.png"],
                                         face_embeddings=torch.zeros(2, 128), embedding_space="dlib-resnet-128",
                                         images=None, latents=None, clip_hidden=None, key=shards.sample_key(9)))
    digest = shards.write_shard(tmp_path / shards.shard_name(0), written)
    assert digest == shards.file_sha256(tmp_path / "faces-000000.tar")
    assert_same_samples(written, list(shards.iterate_shard(tmp_path / "faces-000000.tar")))
    # The same samples give the same bytes (reproducible shards), whenever written.
    shards.write_shard(tmp_path / "again" / shards.shard_name(0), written)
    assert (tmp_path / "again" / "faces-000000.tar").read_bytes() == (tmp_path / "faces-000000.tar").read_bytes()


def test_jpg_crops_round_trip_closely(shards, tmp_path):
    sample = synthetic_sample(shards, 1)
    sample.images = torch.full((3, 32, 32, 3), 100, dtype=torch.uint8)
    shards.write_shard(tmp_path / shards.shard_name(0), [sample], image_format="jpg")
    (read,) = shards.iterate_shard(tmp_path / shards.shard_name(0))
    assert read.images.shape == (3, 32, 32, 3) and (read.images.int() - 100).abs().max() <= 2


def test_shard_paths_lists_finished_shards_only(shards, tmp_path):
    for name in ("faces-000001.tar", "faces-000000.tar", ".faces-000002.tar.abcdefgh.tmp", "notes.tar"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in shards.shard_paths(tmp_path)] == ["faces-000000.tar", "faces-000001.tar"]


def test_index_errors(prepared, shards, tmp_path):
    training_error = shards.TrainingError
    with pytest.raises(training_error, match="does not exist"):
        shards.read_index(tmp_path)
    out, index = prepared
    changed = dict(index, total_photos=index["total_photos"] + 1)
    (tmp_path / "index.json").write_text(json.dumps(changed), encoding="utf-8")
    with pytest.raises(training_error, match="index_hash"):
        shards.read_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps(dict(index, version=99)), encoding="utf-8")
    with pytest.raises(training_error, match="version 99"):
        shards.read_index(tmp_path)
    (tmp_path / "index.json").write_text("{}", encoding="utf-8")
    with pytest.raises(training_error, match="not an IDFuse face dataset"):
        shards.read_index(tmp_path)


def test_a_tar_of_other_samples_is_refused(shards, tmp_path):
    import webdataset

    with webdataset.TarWriter(str(tmp_path / "faces-000000.tar")) as writer:
        writer.write({"__key__": "x", "txt": "hello"})
    with pytest.raises(shards.TrainingError, match="not an IDFuse face shard"):
        list(shards.iterate_shard(tmp_path / "faces-000000.tar"))


# --- clear errors ----------------------------------------------------------------------------------------------


def test_input_errors(errors, tmp_path):
    with pytest.raises(errors.IDFuseInputError, match="does not exist"):
        pf.list_dataset(tmp_path / "missing")
    (tmp_path / "empty" / "someone").mkdir(parents=True)
    (tmp_path / "empty" / "someone" / "notes.txt").write_text("no photos here")
    with pytest.raises(errors.IDFuseInputError, match="dataset is empty"):
        pf.list_dataset(tmp_path / "empty")
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('{"image": "a.jpg", "identity": "x"}\n{"image": "b.jpg"}\n', encoding="utf-8")
    with pytest.raises(errors.IDFuseInputError, match="bad.jsonl line 2"):
        pf.list_dataset(manifest)
    with pytest.raises(errors.IDFuseInputError, match="Unknown face backend 'retina'.*dlib"):
        pf.backend_kind("retina")
    with pytest.raises(errors.IDFuseInputError, match="--resolution 100"):
        pf.PrepSettings(resolution=100).check()
    with pytest.raises(errors.IDFuseInputError, match="--no-images needs --vae"):
        pf.PrepSettings(images=False).check()
    with pytest.raises(errors.IDFuseInputError, match="--face-model"):
        pf.face_model_name(pf.backend_kind("dlib"), "retina")
    assert pf.face_model_name(pf.backend_kind("dlib"), "cnn").startswith("dlib CNN")
    assert pf.face_model_name(pf.backend_kind("insightface"), "") == "buffalo_l"
    with pytest.raises(errors.IDFuseInputError, match="--insightface-root"):
        pf.load_backend(pf.PrepSettings(backend="insightface"), [], "CPU")


def test_command_line_errors_are_logged_not_raised(tmp_path, caplog):
    """main() (what `python scripts/prepare_faces.py` runs) logs the error and exits 2, no traceback."""
    assert pf.main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")], configure_logging=False) == 2
    assert "does not exist" in caplog.text
    caplog.clear()
    assert pf.main([str(tmp_path), "--out", str(tmp_path / "out"), "--backend", "retina"],
                   configure_logging=False) == 2
    assert "Unknown face backend 'retina'" in caplog.text
    caplog.clear()
    assert pf.main(["--merge-index", "--out", str(tmp_path / "nothing")], configure_logging=False) == 2
    assert "holds no prepared shards" in caplog.text


# --- other backends and feature sources -------------------------------------------------------------------------


def test_insightface_backend_when_asked(photo_folder, tmp_path):
    """--backend insightface --insightface-root: insightface's own code on the tests' tiny synthetic buffalo_l (it
    finds the portraits on a wall, Tom's views); the index records its embedding space."""
    for module in ("insightface", "onnxruntime", "onnx"):
        pytest.importorskip(module)
    import onnx_faces

    onnx_faces.write_model_pack(tmp_path / "insightface", "buffalo_l")
    shutil.copytree(photo_folder / "tom", tmp_path / "photos" / "tom")
    code = pf.main([str(tmp_path / "photos"), "--out", str(tmp_path / "out"), "--backend", "insightface",
                    "--insightface-root", str(tmp_path / "insightface"), "--resolution", "64"],
                   configure_logging=False)
    assert code == 0
    from comfyui_idfuse.models.training.face_shards import read_index

    index = read_index(tmp_path / "out")
    assert index["embedding_space"] == "arcface-w600k-512" and index["embedding_width"] == 512
    assert index["backend"] == "insightface buffalo_l" and index["settings"]["backend"] == "insightface"
    # The synthetic detector matches templates: it finds the wall portraits, not necessarily the mirrored one.
    assert index["total_photos"] >= 2 and index["total_photos"] + len(index["skipped_photos"]) == 3


class _Normalize:  # what open_clip's preprocess holds (torchvision's Normalize), by its class name
    def __init__(self, mean, std):
        self.mean, self.std = mean, std


Normalize = type("Normalize", (_Normalize,), {})


class _AddOne(torch.nn.Module):
    def forward(self, x):
        return x + 1


class _SequenceFirstVisual(torch.nn.Module):
    """An open_clip-like vision tower (older open_clip: tokens sequence-first) whose tokens are the mean pixel."""

    def __init__(self):
        super().__init__()
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.ModuleList([_AddOne(), _AddOne(), _AddOne()])

    def forward(self, x):
        tokens = x.mean(dim=(2, 3))[None].expand(257, -1, -1)  # [257, B, 3]
        for block in self.transformer.resblocks:
            tokens = block(tokens)
        return tokens.mean(0)


def test_open_clip_features_are_the_penultimate_block(monkeypatch):
    from types import SimpleNamespace

    def create_model_and_transforms(name, pretrained):
        assert (name, pretrained) == ("ViT-H-14", "weights.bin")
        preprocess = SimpleNamespace(transforms=[object(), Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])])
        return SimpleNamespace(visual=_SequenceFirstVisual()), None, preprocess

    monkeypatch.setitem(sys.modules, "open_clip", SimpleNamespace(create_model_and_transforms=create_model_and_transforms))
    encoder, unconditional = pf.open_clip_features("weights.bin", "ViT-H-14")
    crops = torch.full((2, 224, 224, 3), 0.75)
    features = encoder(crops)
    # (0.75 - 0.5) / 0.25 = 1, after two of the three blocks: 3; batch first.
    assert features.shape == (2, 257, 3) and features.dtype == torch.float16
    assert torch.equal(features.float(), torch.full((2, 257, 3), 3.0))
    assert torch.equal(unconditional, torch.full((1, 257, 3), 2.0))  # the all-zero normalised image


def test_unrecognised_clip_vision_file_is_a_clear_error(errors, tmp_path):
    from safetensors.torch import save_file

    save_file({"something.weight": torch.zeros(2)}, str(tmp_path / "not_clip.safetensors"))
    with pytest.raises(errors.IDFuseInputError, match="--clip-vision .*not_clip.safetensors"):
        pf.load_comfy_clip_vision(str(tmp_path / "not_clip.safetensors"))


def test_missing_feature_files_are_named(photo_folder, tmp_path, caplog):
    code = pf.main([str(photo_folder), "--out", str(tmp_path / "out"), "--vae", str(tmp_path / "vae.safetensors")],
                   configure_logging=False)
    assert code == 2 and "--vae" in caplog.text and "does not exist" in caplog.text
    assert not (tmp_path / "out").exists()
