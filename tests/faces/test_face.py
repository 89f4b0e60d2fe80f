"""Face nodes: insightface's own code (FaceAnalysis, SCRFD, ArcFaceONNX, face_align) on tiny synthetic
ONNX models (tests/support/onnx_faces.py) and real face photos shipped in insightface and scikit-image."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from face_photos import as_image, on_canvas

from comfyui_idfuse.models.errors import FaceAnalysisError, NoFaceError
from comfyui_idfuse.models.faces import images
from comfyui_idfuse.models.faces import insightface as fa
from comfyui_idfuse.models.faces.embed import choose_face, embed_faces
from comfyui_idfuse.models.faces.insightface import InsightFaceBackend
from comfyui_idfuse.models.faces.preview import KEYPOINT_COLOURS

TESTS_DIR = Path(__file__).resolve().parents[1]
SUPPORT_DIR = TESTS_DIR / "support"


@pytest.fixture(scope="module")
def portraits(face_libs) -> dict[str, np.ndarray]:
    """Real face photos on a plain 512x512 wall, at a size the synthetic detector finds at 640."""
    astronaut_face = face_libs.aligned_crop(face_libs.astronaut(), face_libs.ASTRONAUT_KPS)
    return {"astronaut": on_canvas(astronaut_face, 224, (144, 144)),
            "tom": on_canvas(face_libs.tom_hanks(), 224, (144, 144))}


def grey(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1)))


# --- loading -------------------------------------------------------------------------------


@pytest.mark.parametrize("pack", ["buffalo_l", "antelopev2"])
def test_packs_load_through_insightface_router(face_libs, tmp_path, pack):
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    face_libs.write_model_pack(tmp_path, pack)
    backend = InsightFaceBackend.load(pack, [tmp_path], "CPU", 512)
    assert isinstance(backend.analysis.det_model, SCRFD) and backend.analysis.det_model.use_kps
    assert isinstance(backend.analysis.models["recognition"], ArcFaceONNX)
    assert Path(backend.analysis.models["recognition"].model_file).name == fa.MODEL_PACKS[pack].recognizer
    assert backend.detection_sizes == [(512, 512), (384, 384), (256, 256), (160, 160)]


def test_nested_archive_folder_is_used(face_libs, tmp_path):
    inner = face_libs.write_model_pack(tmp_path, "antelopev2", nested=True)
    assert inner == tmp_path / "models" / "antelopev2" / "antelopev2"
    assert fa.find_model_pack("antelopev2", [tmp_path]) == inner
    backend = InsightFaceBackend.load("antelopev2", [tmp_path])
    assert Path(backend.analysis.det_model.model_file).parent == inner


def test_every_insightface_root_is_searched(face_libs, tmp_path):
    empty, extra = tmp_path / "default", tmp_path / "extra"
    empty.mkdir()
    folder = face_libs.write_model_pack(extra, "buffalo_l")
    assert fa.find_model_pack("buffalo_l", [empty, extra]) == folder


def test_missing_model_files_error_and_nothing_downloads(face_libs, tmp_path, monkeypatch):
    import insightface.app

    def no_download(*args, **kwargs):
        raise AssertionError("insightface must not be asked to download or load anything")

    monkeypatch.setattr(insightface.app, "FaceAnalysis", no_download)
    with pytest.raises(FaceAnalysisError) as error:
        InsightFaceBackend.load("antelopev2", [tmp_path])
    message = str(error.value)
    for expected in ("antelopev2", "scrfd_10g_bnkps.onnx", "glintr100.onnx", "antelopev2.zip", "model zoo",
                     str(tmp_path / "models" / "antelopev2")):
        assert expected in message

    # An incomplete folder: the error says which file is missing.
    face_libs.write_model_pack(tmp_path, "buffalo_l")
    (tmp_path / "models" / "buffalo_l" / "w600k_r50.onnx").unlink()
    with pytest.raises(FaceAnalysisError, match=r"lacks w600k_r50\.onnx"):
        InsightFaceBackend.load("buffalo_l", [tmp_path])


def test_damaged_model_file_is_a_clear_error(face_libs, tmp_path):
    folder = face_libs.write_model_pack(tmp_path, "buffalo_l")
    (folder / "det_10g.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(FaceAnalysisError, match="could not load the models|recognised no face detector"):
        InsightFaceBackend.load("buffalo_l", [tmp_path])


def test_detection_size_must_suit_the_detector(insightface_root):
    with pytest.raises(FaceAnalysisError, match="multiple of 32"):
        InsightFaceBackend.load("buffalo_l", [insightface_root], "CPU", 600)


def test_providers_follow_onnxruntime():
    assert fa.available_providers(["CPUExecutionProvider"]) == ["CPU"]
    assert fa.available_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPU"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert fa.available_providers(gpu) == ["CPU", "CUDA"]
    assert fa.provider_chain("CUDA", gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert fa.provider_chain("CPU", gpu) == ["CPUExecutionProvider"]
    with pytest.raises(FaceAnalysisError, match="onnxruntime-gpu"):
        fa.provider_chain("CUDA", ["CPUExecutionProvider"])


def test_provider_input_lists_what_onnxruntime_runs(face_libs, monkeypatch):
    import onnxruntime

    from comfyui_idfuse.nodes.faces import IDFuseLoadFaceAnalysis

    listed = onnxruntime.get_available_providers()
    offered = IDFuseLoadFaceAnalysis.INPUT_TYPES()["required"]["provider"][0]
    assert offered[0] == "CPU" and ("CUDA" in offered) == ("CUDAExecutionProvider" in listed)
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert IDFuseLoadFaceAnalysis.INPUT_TYPES()["required"]["provider"][0] == ["CPU", "CUDA"]


def test_load_node_reads_every_registered_insightface_folder(face_libs, tmp_path, monkeypatch):
    import folder_paths

    from comfyui_idfuse.nodes.faces import IDFuseLoadFaceAnalysis

    default = os.path.join(folder_paths.models_dir, "insightface")
    paths, extensions = folder_paths.folder_names_and_paths["insightface"]
    assert default in paths  # registered when the module was imported
    extra = tmp_path / "shared-insightface"  # e.g. listed under insightface: in extra_model_paths.yaml
    face_libs.write_model_pack(extra, "buffalo_l", nested=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([*paths, str(extra)], extensions))
    (backend,) = IDFuseLoadFaceAnalysis().load("buffalo_l", "CPU", 640)
    assert Path(backend.analysis.det_model.model_file).parent == extra / "models" / "buffalo_l" / "buffalo_l"


def test_fixed_size_detector_is_only_run_at_its_size(face_libs, tmp_path):
    face_libs.write_model_pack(tmp_path, "buffalo_l", detector_input_size=640)
    backend = InsightFaceBackend.load("buffalo_l", [tmp_path], "CPU", 320)
    assert backend.detection_sizes == [(640, 640)]
    # The astronaut's face is found only at 384 by the synthetic detector (see the fallback test).
    with pytest.raises(NoFaceError, match=r"detection sizes tried: 640\)"):
        embed_faces(backend, as_image(face_libs.astronaut()))


# --- detection -------------------------------------------------------------------------------


class ListedDetector:
    """Stands in for insightface's SCRFD: returns fixed detections, in the pixels of the image it gets."""

    input_shape = [1, 3, "?", "?"]

    def __init__(self, found: list[list[float]]):
        self.found = np.array(found, dtype=np.float32)
        self.calls: list[tuple[tuple[int, ...], tuple[int, int]]] = []

    def detect(self, img, input_size=None, max_num=0, metric="default"):
        self.calls.append((img.shape, input_size))
        centres = (self.found[:, :2] + self.found[:, 2:4]) / 2
        return self.found.copy(), np.repeat(centres[:, None, :], 5, axis=1)


def test_faces_are_ordered_left_to_right_in_the_photos_pixels():
    from types import SimpleNamespace

    # insightface lists faces by score: here the right one first.
    detector = ListedDetector([[300, 40, 380, 120, 0.99], [20, 30, 140, 150, 0.80]])
    backend = InsightFaceBackend(SimpleNamespace(det_model=detector, det_size=(640, 640)))
    faces = backend.detect(np.zeros((400, 400, 3), np.uint8))
    assert faces.boxes[:, 0].tolist() == [20, 300] and faces.scores.tolist() == pytest.approx([0.80, 0.99])
    assert choose_face(faces, "largest", 0, "photo 1") == 0 and choose_face(faces, "index", 1, "photo 1") == 1
    assert detector.calls == [((400, 400, 3), (640, 640))]

    # A small photo is detected on a padded canvas; boxes and keypoints come back in its own pixels.
    detector = ListedDetector([[60, 60, 140, 140, 0.9]])
    backend = InsightFaceBackend(SimpleNamespace(det_model=detector, det_size=(640, 640)))
    faces = backend.detect(np.zeros((100, 100, 3), np.uint8))
    assert detector.calls[0][0] == (200, 200, 3)
    assert faces.boxes.tolist() == [[10, 10, 90, 90]] and faces.keypoints[0, 0].tolist() == [50, 50]




def test_detection_falls_back_to_smaller_sizes(face_libs, backend):
    photo = face_libs.astronaut()
    bgr = np.ascontiguousarray(photo[:, :, ::-1])
    assert len(backend.analysis.det_model.detect(bgr, input_size=(640, 640), max_num=0)[0]) == 0  # so 640 alone fails

    embedding, _ = embed_faces(backend, as_image(photo))
    (source,) = embedding.sources
    assert source.det_size[0] < 640 and (source.photo, source.width, source.height) == (1, 512, 512)
    # The face found is the astronaut's: its keypoints are near the hand-labelled ones.
    eye_distance = np.linalg.norm(face_libs.ASTRONAUT_KPS[1] - face_libs.ASTRONAUT_KPS[0])
    error = np.linalg.norm(embedding.keypoints[0].numpy() - face_libs.ASTRONAUT_KPS, axis=1)
    assert error.max() < 0.2 * eye_distance


def test_face_choice_largest_and_by_index(face_libs, backend):
    astronaut_face = face_libs.aligned_crop(face_libs.astronaut(), face_libs.ASTRONAUT_KPS)
    # Two faces on one wall: the astronaut small on the left, Tom Hanks large on the right.
    photo = on_canvas(face_libs.tom_hanks(), 224, (272, 144), on_canvas(astronaut_face, 102, (13, 77)))
    faces = backend.detect(photo)
    assert len(faces) == 2
    centres_x = (faces.boxes[:, 0] + faces.boxes[:, 2]) / 2
    assert centres_x[0] < 256 < centres_x[1]  # ordered left to right

    bgr = np.ascontiguousarray(photo[:, :, ::-1])
    raw_boxes = backend.analysis.det_model.detect(bgr, input_size=faces.det_size, max_num=0)[0]
    raw_areas = (raw_boxes[:, 2] - raw_boxes[:, 0]) * (raw_boxes[:, 3] - raw_boxes[:, 1])
    largest_raw = raw_boxes[np.argmax(raw_areas), :4]

    largest, _ = embed_faces(backend, as_image(photo), face_choice="largest")
    assert np.allclose(largest.boxes[0].numpy(), largest_raw)
    assert largest.sources[0].face == 1 and largest.sources[0].faces_found == 2
    left, _ = embed_faces(backend, as_image(photo), face_choice="index", face_index=0)
    assert left.boxes[0, 2] < 256  # the astronaut
    assert cosine(left.arcface, largest.arcface) < 0.9  # two people, two identities

    with pytest.raises(FaceAnalysisError, match=r"photo 1 of 1 \(512x512 px\) has 2 face\(s\).*face_index 2"):
        embed_faces(backend, as_image(photo), face_choice="index", face_index=2)


def test_grey_and_rgba_images(backend, portraits):
    photo = portraits["astronaut"]
    colour, _ = embed_faces(backend, as_image(photo))

    grey_photo = grey(photo)
    one_channel, _ = embed_faces(backend, as_image(grey_photo[..., None]))
    three_channels, _ = embed_faces(backend, as_image(np.repeat(grey_photo[..., None], 3, axis=-1)))
    assert torch.allclose(one_channel.arcface, three_channels.arcface, atol=1e-6)
    assert cosine(one_channel.arcface, colour.arcface) > 0.98  # same face

    opaque = np.concatenate([photo, np.full((*photo.shape[:2], 1), 255, np.uint8)], axis=-1)
    rgba, _ = embed_faces(backend, as_image(opaque))
    assert torch.allclose(rgba.arcface, colour.arcface, atol=1e-6)

    # A transparent region (a cut-out portrait) is composited over black; the face is still found.
    cutout = opaque.copy()
    cutout[:, 400:, 3] = 0
    cut, cut_preview = embed_faces(backend, as_image(cutout))
    assert cosine(cut.arcface, colour.arcface) > 0.98
    assert float(cut_preview[0, :, 400:].max()) == 0.0 and float(cut_preview[0, :, :400].max()) > 0.0


def test_small_images_are_padded_before_detection(face_libs, backend, monkeypatch):
    import cv2

    # insightface's Tom Hanks sample is an aligned 112x112 face: its keypoints are ArcFace's template.
    tom, _ = embed_faces(backend, as_image(face_libs.tom_hanks()))
    assert np.abs(tom.keypoints[0].numpy() - face_libs.ARCFACE_KPS_112).max() < 6.0

    small = cv2.resize(face_libs.astronaut()[40:200, 140:300], (96, 96), interpolation=cv2.INTER_AREA)
    padded, _ = embed_faces(backend, as_image(small))
    box = padded.boxes[0].numpy()
    assert padded.sources[0].det_size == (640, 640)
    assert box[0] >= -2 and box[1] >= -2 and box[2] <= 98 and box[3] <= 98  # in the 96x96 photo's pixels

    monkeypatch.setattr(images, "SMALL_IMAGE_SIDE", 0)  # without padding the face fills the frame: 640 fails
    unpadded, _ = embed_faces(backend, as_image(small))
    assert unpadded.sources[0].det_size[0] < 640


# --- combining photos ---------------------------------------------------------------------------


def _independent_embedding(face_libs, insightface_root, rgb: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """The recogniser run with onnxruntime directly on insightface's 112 alignment, L2-normalised."""
    import onnxruntime

    recognizer = insightface_root / "models" / "buffalo_l" / "w600k_r50.onnx"
    session = onnxruntime.InferenceSession(str(recognizer), providers=["CPUExecutionProvider"])
    crop = face_libs.aligned_crop(rgb, keypoints, 112).astype(np.float32)
    blob = ((crop - 127.5) / 127.5).transpose(2, 0, 1)[None]
    feature = session.run(None, {session.get_inputs()[0].name: blob})[0][0]
    return feature / np.linalg.norm(feature)


@pytest.mark.parametrize("combine", ["mean", "normalized mean"])
def test_several_photos_are_combined(face_libs, backend, insightface_root, portraits, combine):
    # The full astronaut photo's face is found at a smaller detection size than the portraits'.
    photos = [portraits["astronaut"], portraits["tom"], face_libs.astronaut()]
    embedding, preview = embed_faces(backend, as_image(*photos), combine=combine)
    assert embedding.per_photo_arcface.shape == (3, 512) and embedding.arcface.shape == (1, 512)
    assert [s.photo for s in embedding.sources] == [1, 2, 3]

    expected = np.stack([_independent_embedding(face_libs, insightface_root, photo, kps.numpy())
                         for photo, kps in zip(photos, embedding.keypoints, strict=True)])
    assert np.allclose(embedding.per_photo_arcface.numpy(), expected, atol=1e-4)
    combined = expected.mean(axis=0)
    if combine == "normalized mean":
        combined = combined / np.linalg.norm(combined)
        assert np.isclose(float(embedding.arcface.norm()), 1.0, atol=1e-5)
    assert np.allclose(embedding.arcface[0].numpy(), combined, atol=1e-4)
    assert embedding.clip_hidden is None and preview.shape == (3, 512, 512, 3)


# --- photos without a face -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sky_512(face_libs) -> np.ndarray:
    import cv2

    return cv2.resize(face_libs.sky(), (512, 512), interpolation=cv2.INTER_CUBIC)


def test_photo_without_face_is_named_in_the_error(backend, portraits, sky_512):
    batch = as_image(portraits["astronaut"], sky_512, portraits["tom"])
    with pytest.raises(NoFaceError, match=r"photo 2 of 3 \(512x512 px\).*on_no_face.*'skip'") as error:
        embed_faces(backend, batch)
    assert "photo 1 " not in str(error.value) and "photo 3 " not in str(error.value)


def test_photo_without_face_can_be_skipped(backend, portraits, sky_512):
    batch = as_image(portraits["astronaut"], sky_512, portraits["tom"])
    embedding, preview = embed_faces(backend, batch, on_no_face="skip")
    assert [s.photo for s in embedding.sources] == [1, 3] and embedding.per_photo_arcface.shape == (2, 512)
    assert preview.shape == (3, 512, 512, 3)
    red = torch.tensor([230, 0, 0]) / 255.0
    assert torch.allclose(preview[1, 0, 256], red)  # the skipped photo is framed in red
    assert torch.allclose(preview[1, 256, 256], batch[1, 256, 256], atol=1 / 255)  # and otherwise unchanged


def test_no_face_in_any_photo_is_an_error_even_when_skipping(backend, sky_512):
    flat = np.full((512, 512, 3), 128, np.uint8)
    with pytest.raises(NoFaceError,
                       match=r"photo 1 of 2 .*photo 2 of 2 .*detection sizes tried: 640, 512, 384, 256, 160"):
        embed_faces(backend, as_image(sky_512, flat), on_no_face="skip")


# --- preview ---------------------------------------------------------------------------------------


def test_preview_draws_boxes_and_keypoints(backend, portraits):
    photo = portraits["tom"]
    embedding, preview = embed_faces(backend, as_image(photo))
    assert preview.shape == (1, 512, 512, 3) and preview.dtype == torch.float32
    assert 0.0 <= float(preview.min()) and float(preview.max()) <= 1.0
    x1, y1, x2, y2 = (int(round(float(v))) for v in embedding.boxes[0])
    green = torch.tensor([0, 220, 0]) / 255.0
    assert torch.allclose(preview[0, (y1 + y2) // 2, x1], green)  # the chosen face's box
    for (x, y), colour in zip(embedding.keypoints[0].round().int().tolist(), KEYPOINT_COLOURS, strict=True):
        assert torch.allclose(preview[0, y, x], torch.tensor(colour) / 255.0)
    untouched = torch.from_numpy(photo).float() / 255.0
    assert torch.equal(preview[0, :100, :100], untouched[:100, :100])


# --- CLIP vision ---------------------------------------------------------------------------------


class StubClipVision:
    """ComfyUI's CLIP_VISION interface: encode_image(IMAGE) -> object with .penultimate_hidden_states."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def encode_image(self, image: torch.Tensor):
        self.seen.append(image.clone())
        tokens = torch.arange(257, dtype=torch.float32)[None, :, None]
        channels = torch.arange(1280, dtype=torch.float32)[None, None, :] / 1280
        hidden = image.mean(dim=(1, 2, 3))[:, None, None] + tokens * 1e-3 + channels

        class Output:
            penultimate_hidden_states = hidden
            last_hidden_state = hidden + 1.0

        return Output()


def test_clip_vision_gets_the_aligned_224_crops(face_libs, backend, portraits):
    from comfyui_idfuse.nodes.faces import IDFuseFaceEmbed

    photos = [portraits["astronaut"], portraits["tom"]]
    clip_vision = StubClipVision()
    embedding, preview = IDFuseFaceEmbed().embed(as_image(*photos), backend, "largest", 0, "normalized mean",
                                                 "error", clip_vision=clip_vision)
    crops, unconditional = clip_vision.seen  # the face crops, then the unconditional image once
    assert unconditional.shape == (1, 224, 224, 3)
    assert crops.shape == (2, 224, 224, 3) and 0.0 <= float(crops.min()) and float(crops.max()) <= 1.0
    for photo, kps, crop in zip(photos, embedding.keypoints, crops, strict=True):
        expected = face_libs.aligned_crop(photo, kps.numpy(), 224)  # RGB in, RGB out
        assert torch.allclose(crop, torch.from_numpy(expected).float() / 255.0)
    assert embedding.clip_hidden.shape == (1, 257, 1280)
    expected_hidden = clip_vision.encode_image(crops).penultimate_hidden_states.mean(0, keepdim=True)
    assert torch.allclose(embedding.clip_hidden, expected_hidden)
    assert preview.shape == (2, 512, 512, 3)


def test_face_embed_carries_the_unconditional_clip_features_of_the_reference(face_libs, backend, portraits):
    """With ComfyUI's CLIP vision model (random weights): the negative's features are the model's penultimate
    hidden states of an all-zero normalised input, as IP-Adapter computes them, not of a black image."""
    from ip_adapter_files import random_clip_vision

    from comfyui_idfuse.nodes.faces import IDFuseFaceEmbed

    clip_vision = random_clip_vision()
    embedding, _preview = IDFuseFaceEmbed().embed(as_image(portraits["tom"]), backend, "largest", 0,
                                                  "normalized mean", "error", clip_vision=clip_vision)
    with torch.no_grad():
        reference = clip_vision.model(pixel_values=torch.zeros(1, 3, 224, 224), intermediate_output=-2)[1]
        black = clip_vision.encode_image(torch.zeros(1, 224, 224, 3)).penultimate_hidden_states
    assert embedding.clip_hidden_uncond.shape == (1, 257, 1280) == embedding.clip_hidden.shape
    torch.testing.assert_close(embedding.clip_hidden_uncond, reference.float(), rtol=0, atol=1e-5)
    assert (embedding.clip_hidden_uncond - black).abs().max() > 0.1
    assert clip_vision.image_mean == [0.48145466, 0.4578275, 0.40821073], "the model itself is left as it was"
    assert embedding.backend == "insightface buffalo_l" and embedding.embedding_space == "arcface-w600k-512"


def test_without_clip_vision_there_are_no_clip_features(backend, portraits):
    embedding, _preview = embed_faces(backend, as_image(portraits["tom"]))
    assert embedding.clip_hidden is None and embedding.clip_hidden_uncond is None


def test_clip_vision_output_is_checked(face_libs, backend):
    with pytest.raises(FaceAnalysisError, match="CLIP vision model returned"):
        embed_faces(backend, as_image(face_libs.tom_hanks()), clip_encoder=lambda crops: crops.mean())


# --- nodes ---------------------------------------------------------------------------------------


def test_nodes_describe_every_input():
    from comfyui_idfuse.nodes import faces as face

    assert face.NODE_DISPLAY_NAME_MAPPINGS == {"IDFuseLoadFaceAnalysis": "IDFuse Load Face Analysis",
                                               "IDFuseFaceEmbed": "IDFuse Face Embed"}
    for name, node in face.NODE_CLASS_MAPPINGS.items():
        assert node.CATEGORY == "IDFuse/Infinite-ID" and node.DESCRIPTION
        inputs = node.INPUT_TYPES()
        for group in inputs.values():
            for input_name, (_kind, options) in group.items():
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert len(node.OUTPUT_TOOLTIPS) == len(node.RETURN_TYPES)
    assert face.IDFuseLoadFaceAnalysis.RETURN_TYPES == ("FACE_ANALYSIS",)
    assert face.IDFuseFaceEmbed.RETURN_TYPES == ("ID_EMBEDS", "IMAGE")


def test_pack_imports_without_insightface(tmp_path):
    """In a fresh interpreter where neither insightface and onnxruntime nor dlib can be imported."""
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.machinery, sys

        class Blocker(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            # Importing fails as for a missing package; merely looking the name up (torch's dynamo
            # does, for a list of packages) does not.
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("insightface", "onnxruntime", "dlib"):
                    return importlib.machinery.ModuleSpec(name, self)
                return None

            def create_module(self, spec):
                return None

            def exec_module(self, module):
                raise ModuleNotFoundError(f"No module named {{module.__name__!r}}", name=module.__name__)

        sys.meta_path.insert(0, Blocker())
        sys.path.insert(0, {str(SUPPORT_DIR)!r})
        import comfy_env
        comfy_env.setup_comfy()
        import comfyui_idfuse
        from comfyui_idfuse.nodes import faces as face
        from comfyui_idfuse.models.errors import FaceAnalysisError

        assert face.IDFuseLoadFaceAnalysis.INPUT_TYPES()["required"]["provider"][0] == ["CPU"]
        import torch
        for call in (lambda: face.IDFuseLoadFaceAnalysis().load("antelopev2", "CPU", 640),
                     lambda: face.IDFuseFaceEmbed().embed(torch.zeros(1, 64, 64, 3), object(), "largest", 0,
                                                          "mean", "error")):
            try:
                call()
            except FaceAnalysisError as error:
                print("ERROR:", error)
            else:
                raise SystemExit("no error without insightface")
        assert not any(name.split(".")[0] in ("insightface", "onnxruntime", "dlib") for name in sys.modules)
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 2 and result.stdout.rstrip().endswith("OK")
    for line in errors:
        assert "pip install insightface onnxruntime" in line and "onnxruntime-gpu" in line
        assert "models/insightface/models" in line
