"""IDFuse Load Training Photos: a folder of photos with optional captions (models/training/photo_folder.py), the
square crops around the face (models/training/face_crops.py) and the photos at the training resolution for the
trainer (nodes/glue/training_photos.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_idfuse.models.errors import IDFuseInputError, NoFaceInTrainingPhotoError, TrainingError
from comfyui_idfuse.models.faces.types import DetectedFaces
from comfyui_idfuse.models.training.face_crops import DEFAULT_FACE_SHARE, face_crop, face_square
from comfyui_idfuse.models.training.photo_folder import (
    caption_template,
    folder_fingerprint,
    read_photo_folder,
    resolve_folder,
)
from comfyui_idfuse.nodes.glue.training_photos import photos_at_resolution
from comfyui_idfuse.nodes.training_photos import IDFuseLoadTrainingPhotos

# --- fixtures: small photo folders ---------------------------------------------------------------------------


def photo(height: int = 48, width: int = 64, colour: tuple[int, int, int] = (200, 120, 40)) -> np.ndarray:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:] = colour
    return pixels


def write(folder: Path, name: str, pixels: np.ndarray | None = None, **save) -> Path:
    path = folder / name
    image = Image.fromarray(photo() if pixels is None else pixels)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}[path.suffix.lower()]
    image.save(path, format=fmt, **save)
    return path


def caption(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text, encoding="utf-8")


@pytest.fixture
def input_dir(tmp_path, monkeypatch) -> Path:
    """ComfyUI's input folder, for the node's relative folder names."""
    root = tmp_path / "input"
    root.mkdir()
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(root), raising=False)
    return root


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Every kind of file a user's folder holds."""
    folder = tmp_path / "person"
    folder.mkdir()
    write(folder, "a.jpg")
    caption(folder, "a.txt", "{} laughing\non a beach ")
    write(folder, "b.png")
    caption(folder, "b.txt", "in a red coat")
    write(folder, "c.JPG")  # uppercase extension, no caption
    write(folder, "d.webp")
    caption(folder, "d.txt", "  \n ")  # empty caption
    write(folder, "e.jpg")
    write(folder, "e.png")  # same stem, another extension: both take e.txt
    caption(folder, "e.txt", "sks in the snow")
    write(folder, "f.bmp")
    caption(folder, "f.TXT", "reading")  # uppercase caption extension
    write(folder, "g.png")
    caption(folder, "g.txt", "{} and {}")  # two places: unusable
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    caption(folder, "orphan.txt", "a caption without a photo")
    (folder / "more").mkdir()
    write(folder / "more", "h.jpg")
    (folder / ".DS_Store").write_bytes(b"\0\0")
    return folder


# --- reading a folder ----------------------------------------------------------------------------------------


def test_photos_captions_and_skipped_files(mixed_folder):
    photos = read_photo_folder(mixed_folder)
    assert [p.name for p in photos.photos] == ["a.jpg", "b.png", "c.JPG", "d.webp", "e.jpg", "e.png", "f.bmp",
                                               "g.png"]
    by_name = {p.name: p for p in photos.photos}
    assert by_name["a.jpg"].caption == "{} laughing on a beach"  # line breaks and runs of spaces collapsed
    assert by_name["b.png"].caption == "in a red coat" and by_name["b.png"].caption_file == "b.txt"
    assert by_name["c.JPG"].caption is None and by_name["d.webp"].caption is None
    assert by_name["e.jpg"].caption == by_name["e.png"].caption == "sks in the snow"
    assert by_name["f.bmp"].caption == "reading" and by_name["f.bmp"].caption_file == "f.TXT"
    assert by_name["g.png"].caption is None
    assert all(p.pixels.dtype == torch.uint8 and p.pixels.shape == (48, 64, 3) for p in photos.photos)

    reasons = {item.name: item.reason for item in photos.skipped}
    assert set(reasons) == {"broken.jpg", "notes.pdf", "orphan.txt", "more", "d.txt", "g.txt"}
    assert reasons["broken.jpg"].startswith("unreadable (")
    assert reasons["notes.pdf"].startswith("not a photo (.pdf")
    assert reasons["orphan.txt"] == "a caption without a photo of that name"
    assert reasons["more"].startswith("a folder")
    assert reasons["d.txt"].startswith("empty caption; photo(s) named d use the shared templates")
    assert reasons["g.txt"].startswith("{} written 2 times")

    report = photos.report()
    assert report.startswith(f"8 photo(s) from {mixed_folder}, 5 with a caption (.txt)")
    assert "  1. a.jpg  64x48 (1.33:1 landscape)  caption: {} laughing on a beach\n" in report
    assert "  2. b.png  64x48 (1.33:1 landscape)  caption: in a red coat\n" in report
    assert "  3. c.JPG  64x48 (1.33:1 landscape)\n" in report
    assert "A caption replaces the prompt templates for its photo: {} marks where" in report
    assert "  broken.jpg: unreadable" in report and "  notes.pdf: not a photo" in report
    assert "e.txt is the caption of e.png too" in report
    assert ".DS_Store" not in report


def test_templates_from_captions(mixed_folder):
    photos = read_photo_folder(mixed_folder)
    assert photos.templates("sks") == ["{} laughing on a beach", "{}, in a red coat", None, None, "{} in the snow",
                                       "{} in the snow", "{}, reading", None]
    # Without the trainer's word, a caption that names the person gets the placeholder in front.
    assert photos.templates()[4] == "{}, sks in the snow"


def test_caption_template_cases():
    assert caption_template("{} on a beach", "sks") == "{} on a beach"
    assert caption_template("a portrait of {}, oil", "sks") == "a portrait of {}, oil"
    assert caption_template("on a beach", "sks") == "{}, on a beach"
    assert caption_template("photo of SKS smiling", "sks") == "photo of {} smiling"  # any case
    assert caption_template("sks, smiling", "sks") == "{}, smiling"
    assert caption_template("a sksx and a skss", "sks") == "{}, a sksx and a skss"  # whole words only
    with pytest.raises(TrainingError, match="Caption me.txt names the person 2 times .*Keep one 'sks' or one {}"):
        caption_template("{} and sks", "sks", "me.txt")
    with pytest.raises(TrainingError, match="names the person 2 times"):
        caption_template("sks meets sks", "sks", "me.txt")
    with pytest.raises(TrainingError, match="has {} 2 times"):
        caption_template("{} meets {}", "sks", "me.txt")


def test_caption_extension_is_a_widget(tmp_path):
    write(tmp_path, "a.png")
    caption(tmp_path, "a.caption", "by the sea")
    caption(tmp_path, "a.txt", "not this one")
    photos = read_photo_folder(tmp_path, caption_extension="CAPTION")
    assert photos.photos[0].caption == "by the sea" and photos.caption_extension == ".caption"
    assert [item.name for item in photos.skipped] == ["a.txt"]  # another extension: not a photo, not a caption
    with pytest.raises(IDFuseInputError, match="caption_extension is empty"):
        read_photo_folder(tmp_path, caption_extension=" ")
    with pytest.raises(IDFuseInputError, match="is an image extension"):
        read_photo_folder(tmp_path, caption_extension=".png")


def test_unusable_caption_files_are_reported(tmp_path):
    write(tmp_path, "a.png")
    caption(tmp_path, "a.TXT", "first")
    caption(tmp_path, "a.txt", "second")  # the same photo's caption twice (Linux tells the two apart)
    write(tmp_path, "b.png")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 in latin-1")  # not UTF-8
    caption(tmp_path, "c.txt", "\ufeffby the sea")  # a byte-order mark, as Windows editors write
    write(tmp_path, "c.png")
    photos = read_photo_folder(tmp_path)
    first, b, c = photos.photos
    assert first.caption == "first" and b.caption is None and c.caption == "by the sea"
    reasons = {item.name: item.reason for item in photos.skipped}
    assert reasons == {"a.txt": "a second caption of a (a.TXT is used)",
                       "b.txt": reasons["b.txt"]} and reasons["b.txt"].startswith("unreadable caption (UnicodeDecodeError")


def test_order_is_by_name_with_numbers_by_value(tmp_path):
    for name in ("photo10.jpg", "photo2.jpg", "Photo3.png", "photo1.jpg", "b.jpg", "a10.png", "a9.png"):
        write(tmp_path, name)
    names = [p.name for p in read_photo_folder(tmp_path).photos]
    assert names == ["a9.png", "a10.png", "b.jpg", "photo1.jpg", "photo2.jpg", "Photo3.png", "photo10.jpg"]
    assert [p.name for p in read_photo_folder(tmp_path).photos] == names


def test_max_photos(tmp_path):
    for index in range(5):
        write(tmp_path, f"p{index}.png")
    photos = read_photo_folder(tmp_path, max_photos=3)
    assert [p.name for p in photos.photos] == ["p0.png", "p1.png", "p2.png"]
    assert {item.name: item.reason for item in photos.skipped} == {"p3.png": "beyond max_photos 3",
                                                                   "p4.png": "beyond max_photos 3"}
    assert len(read_photo_folder(tmp_path, max_photos=0)) == 5


def test_exif_orientation_is_applied(tmp_path):
    pixels = photo(30, 60, (0, 0, 255))
    pixels[:, :30] = (255, 0, 0)  # stored: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display", what phones write for a portrait photo
    write(tmp_path, "phone.jpg", pixels, exif=exif.tobytes(), quality=95)
    (shown,) = read_photo_folder(tmp_path).photos
    assert shown.pixels.shape == (60, 30, 3)  # portrait, as the phone showed it
    top, bottom = shown.pixels[:25].float().mean((0, 1)), shown.pixels[35:].float().mean((0, 1))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # the left half is on top now


def test_alpha_grey_and_16_bit_photos_become_rgb(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, :4, 3] = 255  # left half opaque white, right half transparent white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    Image.fromarray(np.full((8, 8), 100, np.uint8), "L").save(tmp_path / "grey.png")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "wide.png")  # 16-bit grey
    photos = {p.name: p.pixels for p in read_photo_folder(tmp_path).photos}
    assert all(pixels.shape == (8, 8, 3) for pixels in photos.values())
    assert photos["cutout.png"][:, :4].eq(255).all() and photos["cutout.png"][:, 4:].eq(0).all()  # over black
    assert photos["grey.png"].eq(100).all()
    assert photos["wide.png"].eq(255).all()


def test_very_large_photos_are_reduced_when_read(tmp_path, monkeypatch):
    from comfyui_idfuse.models.training import photo_folder

    monkeypatch.setattr(photo_folder, "MAX_PHOTO_SIDE", 64)  # instead of writing a 4096+ px photo
    write(tmp_path, "big.png", photo(100, 200))
    write(tmp_path, "small.png", photo(30, 40))
    big, small = read_photo_folder(tmp_path).photos
    assert big.pixels.shape == (32, 64, 3) and big.file_size == (200, 100)  # aspect kept
    assert small.pixels.shape == (30, 40, 3) and small.file_size is None
    assert "1. big.png  64x32 (2.00:1 landscape) reduced from 200x100" in read_photo_folder(tmp_path).report()


@pytest.mark.parametrize("setup", ["missing", "file", "empty", "nothing readable"])
def test_folder_errors_name_the_folder(tmp_path, setup):
    folder = tmp_path / "person"
    if setup == "file":
        folder.write_text("not a folder")
    elif setup != "missing":
        folder.mkdir()
    if setup == "nothing readable":
        (folder / "notes.pdf").write_bytes(b"%PDF")
        (folder / "broken.png").write_bytes(b"\x89PNG broken")
        caption(folder, "broken.txt", "a caption")
    expected = {"missing": "does not exist", "file": "is a file, not a folder", "empty": "is empty",
                "nothing readable": r"has no readable photo \(broken.png: unreadable"}[setup]
    with pytest.raises(IDFuseInputError, match=f"folder {folder} {expected}") as error:
        read_photo_folder(folder)
    assert "photos (jpg, png, webp, bmp)" in str(error.value)


def test_folder_below_the_input_folder(tmp_path):
    base = tmp_path / "input"
    assert resolve_folder("my_person", base) == base / "my_person"
    assert resolve_folder(" people/anna/ ", base) == base / "people" / "anna"
    assert resolve_folder("people/../anna", base) == base / "anna"
    assert resolve_folder(str(tmp_path / "elsewhere"), base) == tmp_path / "elsewhere"  # absolute: as it is
    for escaping in ("../outside", "people/../../outside", ".."):
        with pytest.raises(IDFuseInputError, match=f"folder '{escaping}' leads outside ComfyUI's input folder"):
            resolve_folder(escaping, base)
    with pytest.raises(IDFuseInputError, match="folder is empty"):
        resolve_folder("  ", base)


def test_fingerprint_follows_the_folders_files(tmp_path):
    write(tmp_path, "a.png")
    caption(tmp_path, "a.txt", "on a beach")
    first = folder_fingerprint(tmp_path)
    assert folder_fingerprint(tmp_path) == first
    caption(tmp_path, "a.txt", "in the snow!")
    edited = folder_fingerprint(tmp_path)
    assert edited != first
    write(tmp_path, "b.png")
    assert folder_fingerprint(tmp_path) != edited
    os.utime(tmp_path / "b.png", ns=(0, 0))
    assert folder_fingerprint(tmp_path) not in (first, edited)


# --- the node ------------------------------------------------------------------------------------------------


def test_node_reads_a_folder_below_the_input_folder(input_dir, mixed_folder):
    (input_dir / "person").symlink_to(mixed_folder)  # a folder the user linked into input/ is followed
    node = IDFuseLoadTrainingPhotos()
    photos, preview, report = node.load("person", 2, ".txt", "skip")
    assert [p.name for p in photos.photos] == ["a.jpg", "b.png"] and photos.on_no_face == "skip"
    assert preview.ndim == 4 and preview.shape[0] == 1 and preview.shape[-1] == 3 and preview.dtype == torch.float32
    assert preview.shape[2] == 2 * 256 and 0 <= float(preview.min()) and float(preview.max()) <= 1
    assert "c.JPG: beyond max_photos 2" in report and "left out" in report
    with pytest.raises(IDFuseInputError, match="leads outside ComfyUI's input folder"):
        node.load("../person", 0, ".txt", "error")


def test_preview_shows_each_photo_with_its_caption(tmp_path, input_dir):
    write(tmp_path, "wide.png", photo(50, 200, (255, 0, 0)))
    write(tmp_path, "tall.png", photo(200, 50, (0, 255, 0)))
    caption(tmp_path, "tall.txt", "a very long caption " * 20)
    photos = read_photo_folder(tmp_path)
    sheet = IDFuseLoadTrainingPhotos().load(str(tmp_path), 0, ".txt", "error")[1][0]
    assert sheet.shape[1] == 2 * 256 and sheet.shape[0] > 256  # two cells side by side, text under the photos
    tall, wide = sheet[:256, :256], sheet[:256, 256:]  # sorted by name: tall first
    # Aspect kept: the tall photo fills the cell's height but not its width, the wide one the other way round.
    tall_green = (tall[..., 1] > 0.9) & (tall[..., 0] < 0.1)
    wide_red = (wide[..., 0] > 0.9) & (wide[..., 1] < 0.1)
    assert tall_green.any(0).sum() < 80 and tall_green.any(1).sum() > 240
    assert wide_red.any(1).sum() < 80 and wide_red.any(0).sum() > 240
    text = sheet[256:]
    assert (text > 0.6).any() and len(photos) == 2  # names and captions written under the photos


def test_is_changed_follows_the_folder(input_dir):
    folder = input_dir / "person"
    missing = IDFuseLoadTrainingPhotos.IS_CHANGED(folder="person", max_photos=0, caption_extension=".txt",
                                                  on_no_face="error")
    assert missing.startswith("unreadable: folder")  # no error here: the node runs and raises it
    folder.mkdir()
    write(folder, "a.png")
    first = IDFuseLoadTrainingPhotos.IS_CHANGED(folder="person")
    assert first == IDFuseLoadTrainingPhotos.IS_CHANGED(folder="person") != missing
    caption(folder, "a.txt", "by the sea")
    assert IDFuseLoadTrainingPhotos.IS_CHANGED(folder="person") != first


# --- crops around the face -----------------------------------------------------------------------------------


def test_face_square_geometry():
    # 40 px face / 0.25 = 160 px, centred on the face.
    assert face_square(300, 400, (180, 100, 220, 140), 0.25).box == (120, 40, 280, 200)
    # Near the border: shifted inside the photo, never padded.
    assert face_square(300, 400, (0, 0, 40, 40), 0.25).box == (0, 0, 160, 160)
    # Larger than the photo: its shorter side (the face then takes more of the crop).
    assert face_square(300, 400, (180, 100, 220, 140), 0.1).box == (50, 0, 350, 300)
    assert DEFAULT_FACE_SHARE == 0.4


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_face_crop_is_never_squashed(dtype):
    """A round 'face' in a wide photo stays round in the crop, centred; the crop is the square, resized."""
    height, width, radius, centre = 300, 900, 40, (600, 140)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    disc = ((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) <= radius ** 2
    pixels = torch.zeros(height, width, 3, dtype=torch.uint8)
    pixels[disc] = 255
    source = pixels if dtype == torch.uint8 else pixels.float() / 255
    box = (centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius)
    crop = face_crop(source, box, 128)
    assert crop.pixels.shape == (128, 128, 3) and crop.pixels.dtype == dtype
    assert crop.square.side == 200 and not crop.upscaled  # 80 px face / 0.4
    inside = (crop.pixels.float() / (255 if dtype == torch.uint8 else 1))[..., 0] > 0.5
    rows, columns = inside.any(1).nonzero()[:, 0], inside.any(0).nonzero()[:, 0]
    extent_y, extent_x = int(rows[-1] - rows[0] + 1), int(columns[-1] - columns[0] + 1)
    assert abs(extent_x - extent_y) <= 1 and abs(extent_x - 80 * 128 / 200) <= 2  # round, same scale both ways
    assert abs(float(columns.float().mean()) - 63.5) < 1.5 and abs(float(rows.float().mean()) - 63.5) < 1.5
    assert crop.face_box == pytest.approx((38.4, 38.4, 89.6, 89.6))


def test_small_photo_is_upscaled_not_padded():
    pixels = torch.full((60, 90, 3), 128, dtype=torch.uint8)
    crop = face_crop(pixels, (30, 10, 60, 40), 256)
    assert crop.upscaled and crop.square.box == (15, 0, 75, 60)  # the photo's shorter side, inside the photo
    assert crop.pixels.shape == (256, 256, 3) and crop.pixels.eq(128).all()  # no black padding anywhere


# --- photos at the training resolution -----------------------------------------------------------------------


class BrightSpotDetector:
    """Finds one 'face': the box around a photo's white pixels (none in a photo without any)."""

    name = "test detector"

    def detect(self, rgb: np.ndarray) -> DetectedFaces:
        ys, xs = np.nonzero(rgb[..., 0] == 255)
        if len(xs) == 0:
            return DetectedFaces.none_found()
        box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
        return DetectedFaces.left_to_right(box, np.ones(1), None)


def face_photo(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    pixels = photo(height, width, (60, 90, 120))
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = 255
    return pixels


def test_photos_at_resolution_crops_around_each_face(tmp_path, caplog):
    write(tmp_path, "a_landscape.png", face_photo(400, 800, (500, 100, 580, 180)))
    write(tmp_path, "b_portrait.png", face_photo(900, 300, (100, 200, 180, 280)))
    write(tmp_path, "c_small.png", face_photo(100, 120, (40, 30, 80, 70)))
    caption(tmp_path, "b_portrait.txt", "sks by the sea")
    photos = read_photo_folder(tmp_path)
    with caplog.at_level(logging.INFO, logger="idfuse.nodes"):
        images, masks, templates = photos_at_resolution(photos, BrightSpotDetector(), 128, placeholder="sks")
    assert images.shape == (3, 128, 128, 3) and images.dtype == torch.float32 and masks.shape == (3, 128, 128)
    assert templates == [None, "{} by the sea", None]
    for image, mask in zip(images, masks, strict=True):
        face = image[..., 0] > 0.99
        rows, columns = face.any(1).nonzero()[:, 0], face.any(0).nonzero()[:, 0]
        assert abs(len(rows) - len(columns)) <= 2  # a square face stays square: never squashed
        assert abs(float(rows.float().mean()) - 63.5) < 3 and abs(float(columns.float().mean()) - 63.5) < 3
        # The trainer's ellipse from the box: over the face (all but the box's corners), little else.
        covered = float(mask[face].gt(0.5).float().mean())
        assert covered > 0.75 and float(mask.sum()) < 2 * float(face.sum())
    assert abs(int((images[0][..., 0] > 0.99).any(1).sum()) - 128 * DEFAULT_FACE_SHARE) <= 2
    upscaled = [r.getMessage() for r in caplog.records if "upscaled" in r.getMessage()]
    assert len(upscaled) == 1 and upscaled[0].startswith("c_small.png: the square around the face is 100 px")


def test_photo_without_a_face(tmp_path, caplog, monkeypatch):
    from comfyui_idfuse.nodes.glue import training_masks

    monkeypatch.setattr(training_masks, "built_in_detector", BrightSpotDetector)  # no face_analysis connected
    write(tmp_path, "a.png", face_photo(200, 200, (80, 80, 120, 120)))
    write(tmp_path, "b_wall.png", photo(200, 200))
    caption(tmp_path, "a.txt", "{} at work")
    caption(tmp_path, "b_wall.txt", "a wall")
    strict = read_photo_folder(tmp_path)
    with pytest.raises(NoFaceInTrainingPhotoError, match=rf"No face found by the test detector in b_wall.png in "
                                                         rf"{tmp_path}.*Remove it from the folder, set on_no_face "
                                                         rf"to skip on IDFuse Load Training Photos, connect IDFuse "
                                                         rf"Load Face Analysis"):
        photos_at_resolution(strict, None, 64)
    lenient = read_photo_folder(tmp_path, on_no_face="skip")
    with caplog.at_level(logging.WARNING, logger="idfuse.nodes"):
        images, masks, templates = photos_at_resolution(lenient, BrightSpotDetector(), 64)
    assert images.shape[0] == masks.shape[0] == 1 and templates == ["{} at work"]  # its template left out with it
    assert any("b_wall.png" in r.getMessage() and "left out of training" in r.getMessage() for r in caplog.records)
    (tmp_path / "a.png").unlink()
    with pytest.raises(NoFaceInTrainingPhotoError, match="in b_wall.png"):  # nothing left to train on
        photos_at_resolution(read_photo_folder(tmp_path, on_no_face="skip"), BrightSpotDetector(), 64)


def test_astronaut_with_the_built_in_detector(tmp_path):
    """A real face (scikit-image's astronaut, on a wide canvas) found by dlib's HOG detector: the crop is centred on
    it and the face takes about the encoder crops' share of it."""
    pytest.importorskip("dlib", reason="the built-in face detector is dlib's HOG detector")
    from skimage import data

    canvas = np.full((512, 1100, 3), 90, np.uint8)
    canvas[:, 500:1012] = data.astronaut()
    write(tmp_path, "astronaut.png", canvas)
    photos = read_photo_folder(tmp_path)
    images, masks, templates = photos_at_resolution(photos, None, 256)
    assert images.shape == (1, 256, 256, 3) and templates == [None]
    face_x1, face_y1, face_x2, face_y2 = 176 + 500, 70, 272 + 500, 178  # hand-labelled (tests/faces)
    side = max(face_x2 - face_x1, face_y2 - face_y1) / DEFAULT_FACE_SHARE
    # The crop holds the photo's square around the face: compare with that square cut and resized by hand.
    ys, xs = np.nonzero(masks[0].numpy() > 0.5)
    centre_x, centre_y = xs.mean() / 256 * side, ys.mean() / 256 * side
    assert abs(centre_x - side / 2) < 0.1 * side and abs(centre_y - side / 2) < 0.2 * side
    expected = Image.fromarray(canvas).crop((round((face_x1 + face_x2) / 2 - side / 2),
                                             max(0, round((face_y1 + face_y2) / 2 - side / 2)),
                                             round((face_x1 + face_x2) / 2 + side / 2),
                                             max(0, round((face_y1 + face_y2) / 2 - side / 2)) + round(side)))
    expected = torch.from_numpy(np.array(expected.resize((256, 256), Image.Resampling.BICUBIC))).float() / 255
    assert float((images[0] - expected).abs().mean()) < 0.08  # the same picture, within the detector's box error


# --- the folder through the trainer --------------------------------------------------------------------------


def test_a_folder_trains_with_its_crops_and_captions(tmp_path, input_dir, tokenizer_dir, one_torch_thread,
                                                     monkeypatch):
    """IDFuse Load Training Photos -> IDFuse Train Identity on the small models: the trainer gets the face crops at
    its resolution and the captions' templates (the placeholder word of a caption becomes the place)."""
    from factories import make_clip, make_model, tiny_vae
    from trainer_inputs import SIZE, settings

    from comfyui_idfuse.models.training.token_trainer import IdentityTrainer
    from comfyui_idfuse.nodes.glue.training_models import SplicingTextEncoder
    from comfyui_idfuse.nodes.train import IDFuseTrainIdentity

    folder = input_dir / "anna"
    folder.mkdir()
    write(folder, "1_landscape.png", face_photo(200, 400, (250, 60, 310, 120)))
    write(folder, "2_portrait.png", face_photo(400, 150, (40, 100, 100, 160)))
    caption(folder, "2_portrait.txt", "sks smiling")
    photos = IDFuseLoadTrainingPhotos().load("anna", 0, ".txt", "error")[0]
    trainers, encoders = [], []
    made, made_encoder = IdentityTrainer.__init__, SplicingTextEncoder.__init__

    def spy(trainer, *args, **kwargs):
        made(trainer, *args, **kwargs)
        trainers.append(trainer)

    def encoder_spy(encoder, *args, **kwargs):
        made_encoder(encoder, *args, **kwargs)
        encoders.append(encoder)

    monkeypatch.setattr(IdentityTrainer, "__init__", spy)
    monkeypatch.setattr(SplicingTextEncoder, "__init__", encoder_spy)
    kwargs = settings(save_name="photo_folder_run", steps=1, lora_rank=0, attention_mode="off",
                      templates="a photo of the face of {}")
    with torch.inference_mode():
        outputs = IDFuseTrainIdentity().train(make_model("sd15"), make_clip("sd15", tokenizer_dir), tiny_vae(),
                                              None, face_analysis=BrightSpotDetector(), training_photos=photos,
                                              **kwargs)
    (trainer,) = trainers
    assert trainer.data.num_photos == 2 and tuple(trainer.data.latents.shape[-2:]) == (SIZE // 8, SIZE // 8)
    assert trainer.data.photo_templates.tolist() == [-1, 1]  # photo 2: its caption, after the shared template
    assert {encoder.templates for encoder in encoders} == {("a photo of the face of {}", "{} smiling")}
    assert outputs[4].shape[0] == 2  # attention maps: a row per photo
