"""IDFuse Identity Score: real photos scored with insightface's own code on the synthetic ONNX models
(tests/support/onnx_faces.py), a backend with dlib's distance rule, and the node's inputs and outputs."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from face_photos import as_image, on_canvas

from comfyui_idfuse.models.errors import IDFuseInputError, NoFaceError
from comfyui_idfuse.models.faces.embed import embed_faces
from comfyui_idfuse.models.faces.preview import CHOSEN_COLOUR, NO_FACE_COLOUR, draw_faces
from comfyui_idfuse.models.faces.scoring import (
    NO_FACE,
    best_first,
    reference_from_inputs,
    score_images,
)
from comfyui_idfuse.models.faces.types import DetectedFaces, Face
from comfyui_idfuse.nodes.scoring import IDFuseIdentityScore


@pytest.fixture(scope="module")
def photos(face_libs) -> dict[str, np.ndarray]:
    import cv2

    astronaut_face = face_libs.aligned_crop(face_libs.astronaut(), face_libs.ASTRONAUT_KPS)
    tom = face_libs.tom_hanks()
    return {
        "astronaut": on_canvas(astronaut_face, 224, (144, 144)),
        "astronaut moved": on_canvas(astronaut_face, 224, (250, 230)),
        "astronaut photo": cv2.resize(face_libs.astronaut(), (512, 512), interpolation=cv2.INTER_AREA),
        "tom": on_canvas(tom, 224, (144, 144)),
        "tom moved": on_canvas(tom, 224, (40, 60)),
        # Two people: the astronaut small on the left, Tom Hanks large on the right.
        "two": on_canvas(tom, 224, (272, 144), on_canvas(astronaut_face, 102, (13, 77))),
        "sky": cv2.resize(face_libs.sky(), (512, 512), interpolation=cv2.INTER_CUBIC),
    }


def table_rows(table: str) -> list[list[str]]:
    """The cells of each row below the header (columns are two or more spaces apart)."""
    return [re.split(r"\s{2,}", row.strip()) for row in table.splitlines()[2:]]


def run_node(images, backend, sort=True, **reference):
    return IDFuseIdentityScore().score(images, backend, sort, **reference)


# --- ranking ---------------------------------------------------------------------------------------


def test_batch_is_ranked_same_person_first(backend, photos):
    names = ["tom", "sky", "astronaut moved", "astronaut photo"]
    images = as_image(*(photos[n] for n in names))
    scores, table, preview, ranked = run_node(images, backend, reference_images=as_image(photos["astronaut"]))

    batch, _ = score_images(backend, images, reference_from_inputs(backend, as_image(photos["astronaut"])))
    order = batch.order
    assert {names[i] for i in order[:2]} == {"astronaut moved", "astronaut photo"}  # the same person first
    assert [names[i] for i in order[2:]] == ["tom", "sky"]  # then the other person, then no face
    assert min(scores[:2]) > 0.7 > 0.3 > scores[2] and scores[3] == 0.0
    assert scores == sorted(scores, reverse=True) and len(scores) == 4
    assert torch.equal(ranked, images[torch.tensor(order)])
    assert preview.shape == images.shape
    rows = table_rows(table)
    assert [int(row[1]) for row in rows] == [i + 1 for i in order]  # 1-based image numbers, best first
    assert rows[-1][2:4] == ["0", NO_FACE]


def test_other_reference_reverses_the_ranking(backend, photos):
    names = ["astronaut moved", "tom moved", "astronaut photo"]
    images = as_image(*(photos[n] for n in names))
    scores, _, _, ranked = run_node(images, backend, reference_images=as_image(photos["tom"]))
    assert torch.equal(ranked[0], images[1]) and scores[0] > 0.7 > 0.3 > max(scores[1:])


def test_id_embeds_reference_scores_like_the_photos(backend, photos):
    reference = as_image(photos["astronaut"], photos["astronaut moved"])
    embedding, _ = embed_faces(backend, reference)
    images = as_image(photos["tom"], photos["astronaut photo"])
    from_photos = run_node(images, backend, reference_images=reference)
    from_embeds = run_node(images, backend, id_embeds=embedding)
    assert from_photos[0] == pytest.approx(from_embeds[0], abs=1e-5)
    assert "ID_EMBEDS of 2 photo(s)" in from_embeds[1] and "2 reference photo(s)" in from_photos[1]


def test_sort_off_keeps_the_batch_order(backend, photos):
    images = as_image(photos["sky"], photos["tom"], photos["astronaut photo"])
    scores, table, preview, same = run_node(images, backend, sort=False, reference_images=as_image(photos["tom"]))
    assert torch.equal(same, images) and scores[0] == 0.0 and scores[1] > 0.7 > scores[2]
    assert [int(row[1]) for row in table_rows(table)] == [2, 3, 1]  # the table is still best first
    assert torch.allclose(preview[0, 0, 256], torch.tensor(NO_FACE_COLOUR) / 255.0)  # preview follows the images


# --- no face, several faces --------------------------------------------------------------------------


def test_images_without_a_face_score_zero_and_never_fail(backend, photos):
    flat = np.full((512, 512, 3), 128, np.uint8)
    tiny = np.full((8, 8, 3), 200, np.uint8)
    for batch in (as_image(photos["sky"], flat), as_image(tiny)):
        scores, table, preview, images = run_node(batch, backend, reference_images=as_image(photos["astronaut"]))
        assert scores == [0.0] * len(batch) and all(np.isfinite(scores))
        assert table.count(NO_FACE) == len(batch) and "nan" not in table.lower()
        assert preview.shape == batch.shape and torch.isfinite(preview).all()
    # the preview writes "no face" in red in the top-left corner of the red frame
    sky_preview = run_node(as_image(photos["sky"]), backend, reference_images=as_image(photos["tom"]))[2][0]
    red = torch.tensor(NO_FACE_COLOUR) / 255.0
    corner = sky_preview[4:30, 4:80].reshape(-1, 3)
    assert (corner - red).abs().amax(dim=1).lt(0.02).sum() > 20


def test_reference_photos_without_a_face_are_a_clear_error(backend, photos):
    with pytest.raises(NoFaceError, match=r"reference_images: No face found in photo 1 of 1"):
        run_node(as_image(photos["tom"]), backend, reference_images=as_image(photos["sky"]))


def test_several_faces_score_the_best_match_and_count_the_faces(backend, photos):
    images = as_image(photos["two"])
    for reference, best_x in (("astronaut", 13), ("tom", 272)):  # the smaller face when it is the person
        batch, _ = score_images(backend, images, reference_from_inputs(backend, as_image(photos[reference])))
        score = batch.scores[0]
        assert len(score.faces) == 2 and score.best == (0 if best_x < 256 else 1)
        assert abs(score.box[0] - best_x) < 30
        assert score.similarity == pytest.approx(float(score.similarities.max()))
        assert score.similarity > 0.7 > 0.3 > float(score.similarities.min())
        row = table_rows(batch.table())[0]
        assert row[2] == "2" and float(row[3]) == pytest.approx(score.similarity, abs=1e-4)


def test_preview_boxes_every_face_and_writes_its_score(backend, photos):
    photo = photos["two"]
    _, _, preview, _ = run_node(as_image(photo), backend, reference_images=as_image(photos["tom"]))
    batch, _ = score_images(backend, as_image(photo), reference_from_inputs(backend, as_image(photos["tom"])))
    faces = batch.scores[0].faces
    boxes_only = torch.from_numpy(draw_faces(photo, faces, batch.scores[0].best)).float() / 255.0
    x1, y1, x2, y2 = (int(round(float(v))) for v in faces.boxes[1])  # Tom, the best match
    green = torch.tensor(CHOSEN_COLOUR) / 255.0
    assert torch.allclose(preview[0, (y1 + y2) // 2, x1], green)  # its box
    label = preview[0, max(y1 - 30, 0):y1, x1:x1 + 80]  # the score above the box: green text on black
    assert (label - green).abs().amax(dim=-1).lt(0.02).sum() > 20
    assert not torch.equal(label, boxes_only[max(y1 - 30, 0):y1, x1:x1 + 80])
    small = faces.boxes[0]  # the other face is labelled too
    other = preview[0, max(int(small[1]) - 30, 0):int(small[1]), int(small[0]):int(small[0]) + 80]
    assert not torch.equal(other, boxes_only[max(int(small[1]) - 30, 0):int(small[1]),
                                             int(small[0]):int(small[0]) + 80])


# --- references --------------------------------------------------------------------------------------


def test_reference_of_another_embedding_space_is_refused(backend, photos):
    embedding, _ = embed_faces(backend, as_image(photos["astronaut"]))
    embedding.embedding_space = "dlib-resnet-128"
    with pytest.raises(IDFuseInputError, match=r"dlib-resnet-128.*arcface-w600k-512.*cannot be compared"):
        run_node(as_image(photos["tom"]), backend, id_embeds=embedding)


@pytest.mark.parametrize("given", ["both", "neither"])
def test_exactly_one_reference(backend, photos, given):
    reference = {}
    if given == "both":
        embedding, _ = embed_faces(backend, as_image(photos["astronaut"]))
        reference = {"reference_images": as_image(photos["astronaut"]), "id_embeds": embedding}
    with pytest.raises(IDFuseInputError, match=f"got {given} of reference_images and id_embeds"):
        run_node(as_image(photos["tom"]), backend, **reference)


# --- dlib's distance rule, on a backend whose vectors are known -------------------------------------------


class VectorBackend:
    """A FaceBackend with dlib's distance rule whose faces and raw descriptors are set by the test (photo n is
    a uniform image of value n); like dlib's, embed is the descriptor scaled to unit length."""

    name = "known vectors"
    embedding_space = "dlib-resnet-128"
    same_person_distance = 0.6

    def __init__(self, faces_of_photo: dict[int, list[np.ndarray]]):
        self.faces_of_photo = faces_of_photo

    def _vectors(self, rgb: np.ndarray) -> list[np.ndarray]:
        return self.faces_of_photo.get(int(rgb[0, 0, 0]), [])

    def detect(self, rgb: np.ndarray) -> DetectedFaces:
        count = len(self._vectors(rgb))
        if count == 0:
            return DetectedFaces.none_found()
        boxes = np.array([[10 + 60 * i, 10, 50 + 60 * i, 50] for i in range(count)], np.float32)
        keypoints = np.repeat(boxes[:, None, :2], 5, axis=1)
        return DetectedFaces.left_to_right(boxes, np.ones(count), keypoints)

    def align(self, rgb, keypoints, size):
        return np.zeros((size, size, 3), np.uint8)

    def descriptor(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        return self._vectors(rgb)[int((face.box[0] - 10) // 60)]

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        vector = self.descriptor(rgb, face)
        return vector / np.linalg.norm(vector)


def uniform(value: int) -> np.ndarray:
    return np.full((64, 160, 3), value, np.uint8)


def test_dlib_space_reports_the_distance_and_the_same_person_threshold():
    person = np.zeros(128, np.float32)
    person[0] = 0.9  # dlib's vectors are not unit length: the distance is on them as they are
    near, far = person.copy(), person.copy()
    near[1] = 0.5  # distance 0.5 < 0.6
    far[1] = 0.7  # distance 0.7 > 0.6
    backend = VectorBackend({1: [person], 2: [far], 3: [near], 4: [far, near]})
    scores, table, _, ranked = run_node(as_image(uniform(2), uniform(3), uniform(4), uniform(5)), backend,
                                        reference_images=as_image(uniform(1)))
    batch, _ = score_images(backend, as_image(uniform(2), uniform(3), uniform(4), uniform(5)),
                            reference_from_inputs(backend, as_image(uniform(1))))
    far_score, near_score, both, none = batch.scores
    assert far_score.distance == pytest.approx(0.7, abs=1e-5) and far_score.same_person is False
    assert near_score.distance == pytest.approx(0.5, abs=1e-5) and near_score.same_person is True
    assert both.best == 1 and both.distance == pytest.approx(0.5, abs=1e-5) and len(both.faces) == 2
    assert none.distance is None and none.same_person is None and none.similarity == 0.0
    assert near_score.similarity == pytest.approx(0.9 / np.hypot(0.9, 0.5), abs=1e-5)  # cosine as well
    assert "raw descriptors, same person below 0.6" in table
    rows = table_rows(table)
    assert [row[1] for row in rows] == ["2", "3", "1", "4"]  # near (and the photo holding it) first
    assert rows[0][4:6] == ["0.5000", "yes"] and rows[2][4:6] == ["0.7000", "no"]
    assert rows[3][3:6] == [NO_FACE, "-", "-"]
    assert scores[0] == pytest.approx(near_score.similarity) and ranked.shape[0] == 4


def test_id_embeds_reference_in_dlib_space_uses_unit_vectors():
    from comfyui_idfuse.models.faces.dlib import unit_distance_threshold

    person = np.zeros(128, np.float32)
    person[0] = 1.5
    other = np.zeros(128, np.float32)
    other[:2] = [1.2, 0.9]  # cosine 0.8 with the person: unit distance sqrt(2 - 2 * 0.8) = 0.632
    backend = VectorBackend({1: [person], 2: [other], 3: [person * 0.9]})
    embedding, _ = embed_faces(backend, as_image(uniform(1)))
    batch, _ = score_images(backend, as_image(uniform(2), uniform(3)),
                            reference_from_inputs(backend, id_embeds=embedding))
    other_score, same = batch.scores
    assert other_score.distance == pytest.approx(np.sqrt(0.4), abs=1e-5) and other_score.same_person is False
    assert same.distance == pytest.approx(0.0, abs=1e-5) and same.same_person is True  # length does not count
    assert other_score.threshold == pytest.approx(unit_distance_threshold())
    assert "unit vectors (ID_EMBEDS holds no raw descriptors)" in batch.table()


def test_arcface_spaces_have_no_distance_column(backend, photos):
    _, table, _, _ = run_node(as_image(photos["tom"]), backend, reference_images=as_image(photos["tom"]))
    assert "distance" not in table.splitlines()[1] and "same person" not in table


def test_ties_keep_the_batch_order():
    from comfyui_idfuse.models.faces.scoring import ImageScore

    def score(index, similarity):
        faces = DetectedFaces.none_found() if similarity is None else DetectedFaces.left_to_right(
            np.array([[0, 0, 4, 4]]), np.ones(1), np.zeros((1, 5, 2)))
        values = np.zeros(0) if similarity is None else np.array([similarity], np.float32)
        return ImageScore(index, 8, 8, faces, values, None, None)

    assert best_first([score(0, None), score(1, 0.5), score(2, 0.9), score(3, 0.5), score(4, -0.2)]) == [2, 1, 3, 4, 0]


def test_id_embeds_must_be_an_id_embeds(backend, photos):
    with pytest.raises(IDFuseInputError, match="not an ID_EMBEDS"):
        run_node(as_image(photos["tom"]), backend, id_embeds=torch.zeros(1, 512))


# --- the real dlib backend ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dlib_backend():
    from comfyui_idfuse.models.faces.dlib import MODELS, DlibBackend

    missing = DlibBackend.missing_dependencies()
    if missing:
        pytest.skip(missing)
    return DlibBackend.load(next(iter(MODELS)), [], "CPU", 640)


def test_dlib_ranks_real_photos_and_applies_its_threshold(face_libs, dlib_backend):
    import cv2

    astronaut = face_libs.astronaut()
    mirror = np.ascontiguousarray(astronaut[:, ::-1])
    group = cv2.resize(face_libs.insightface_sample("t1.jpg"), (512, 512), interpolation=cv2.INTER_AREA)
    tom = on_canvas(face_libs.tom_hanks(), 224, (144, 144))
    sky = cv2.resize(face_libs.sky(), (512, 512), interpolation=cv2.INTER_CUBIC)
    images = as_image(tom, mirror, sky, group)
    scores, table, _, ranked = run_node(images, dlib_backend, reference_images=as_image(astronaut))
    batch, _ = score_images(dlib_backend, images, reference_from_inputs(dlib_backend, as_image(astronaut)))
    assert batch.order[0] == 1 and torch.equal(ranked[0], images[1])  # her mirror image first
    same, others = batch.scores[1], [batch.scores[0], batch.scores[3]]
    assert same.distance < 0.6 and same.same_person
    assert all(score.distance > 0.6 and score.same_person is False for score in others)
    assert len(batch.scores[3].faces) >= 5 and not batch.scores[2].found and scores[-1] == 0.0
    assert "raw descriptors, same person below 0.6" in table
