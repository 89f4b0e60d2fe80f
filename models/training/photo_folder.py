"""A folder of training photos with optional captions (IDFuse Load Training Photos): what is read, what each
caption's prompt template is, what was skipped and why, and the preview of it all. Plain torch and Pillow.

Photos keep their own size and aspect: the trainer crops each to a square around the face
(``nodes/glue/training_photos.py``, ``face_crops.py``). A caption is ``<photo stem><caption extension>`` beside the
photo (``me.jpg`` + ``me.txt``); it becomes that photo's prompt template (``caption_template``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import IDFuseInputError, TrainingError
from ..faces.images import rgb_float, to_uint8

log = logging.getLogger("idfuse.training")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_CAPTION_EXTENSION = ".txt"
PLACEHOLDER_MARK = "{}"
THUMBNAIL_SIDE = 256  # the preview's photo cells
PREVIEW_COLUMNS = 4
CAPTION_LINES = 3  # caption lines under a thumbnail; longer captions end in "..."
# Photos with a longer side above this are reduced to it when read: a 48-megapixel phone photo would hold 144 MB
# for a crop of at most 2048² (the largest training resolution), and the face still spans hundreds of pixels.
MAX_PHOTO_SIDE = 4096
# What the trainer does with a photo in which its face detector finds no face (it crops around the face).
NO_FACE_ACTIONS = ("error", "skip")


@dataclass(frozen=True)
class TrainingPhoto:
    name: str  # the file name in the folder
    pixels: torch.Tensor  # uint8 RGB [H, W, 3], EXIF orientation applied
    caption: str | None = None  # the caption file's text (whitespace collapsed), None without one
    caption_file: str | None = None
    file_size: tuple[int, int] | None = None  # (width, height) in the file when it was reduced (MAX_PHOTO_SIDE)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


@dataclass(frozen=True)
class SkippedFile:
    name: str
    reason: str


@dataclass(frozen=True)
class TrainingPhotos:
    """What travels on the IDFUSE_TRAINING_PHOTOS socket: the photos of one folder, sorted by name, with their
    captions, and what was left out."""

    folder: str  # the folder's absolute path
    photos: tuple[TrainingPhoto, ...]
    skipped: tuple[SkippedFile, ...] = ()
    caption_extension: str = DEFAULT_CAPTION_EXTENSION
    on_no_face: str = "error"  # one of NO_FACE_ACTIONS
    notes: tuple[str, ...] = ()  # what the report should say besides the photos and skips

    def __len__(self) -> int:
        return len(self.photos)

    def templates(self, placeholder: str | None = None) -> list[str | None]:
        """Each photo's prompt template (see ``caption_template``), None for a photo without a caption."""
        return [None if photo.caption is None else caption_template(photo.caption, placeholder, photo.caption_file)
                for photo in self.photos]

    def report(self) -> str:
        captioned = sum(photo.caption is not None for photo in self.photos)
        lines = [f"{len(self.photos)} photo(s) from {self.folder}, {captioned} with a caption "
                 f"({self.caption_extension}); the trainer crops each to a square around the face (a photo without a face: "
                 f"{'left out' if self.on_no_face == 'skip' else 'an error'})."]
        for number, photo in enumerate(self.photos, start=1):
            line = f"{number:3d}. {photo.name}  {photo.width}x{photo.height} ({aspect_text(photo.width, photo.height)})"
            if photo.file_size is not None:
                line += f" reduced from {photo.file_size[0]}x{photo.file_size[1]}"
            if photo.caption is not None:
                line += f"  caption: {photo.caption}"
            lines.append(line)
        if captioned:
            lines.append(f"A caption replaces the prompt templates for its photo: {PLACEHOLDER_MARK} marks where the "
                         f"person goes, else the trainer's placeholder word written in it, else "
                         f"'{PLACEHOLDER_MARK}, ' is put in front.")
        if self.skipped:
            lines.append(f"Skipped ({len(self.skipped)}):")
            lines += [f"  {item.name}: {item.reason}" for item in self.skipped]
        lines += list(self.notes)
        return "\n".join(lines)


# --- the folder ----------------------------------------------------------------------------------------------


def resolve_folder(folder: str, input_directory: str | os.PathLike) -> Path:
    """The folder a user typed: absolute as it is (``~`` expanded), relative below ComfyUI's input folder. A relative
    path that leaves the input folder (``../x``) is refused. Checked lexically: a symlink the user put into the
    input folder is followed."""
    text = folder.strip()
    if not text:
        raise IDFuseInputError("folder is empty: give a folder below ComfyUI's input folder (e.g. my_person for "
                               "input/my_person) or an absolute path.")
    path = Path(os.path.expanduser(text))
    if path.is_absolute():
        return Path(os.path.normpath(path))
    base = Path(os.path.normpath(os.path.abspath(input_directory)))
    resolved = Path(os.path.normpath(base / path))
    if resolved != base and base not in resolved.parents:
        raise IDFuseInputError(f"folder '{text}' leads outside ComfyUI's input folder {base}; give a folder below it "
                               f"(e.g. my_person), or an absolute path.")
    return resolved


def name_order(name: str) -> tuple:
    """Sort key of file names: by name, numbers by value (photo2 before photo10), then the name itself."""
    parts = re.split(r"(\d+)", name.casefold())
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts), name


def normal_extension(extension: str) -> str:
    """``txt``, ``.TXT`` -> ``.txt``."""
    text = extension.strip().lower()
    if not text or text == ".":
        raise IDFuseInputError("caption_extension is empty; use .txt (captions in <photo name>.txt beside each photo).")
    if text in IMAGE_EXTENSIONS or text.lstrip(".") in (e.lstrip(".") for e in IMAGE_EXTENSIONS):
        raise IDFuseInputError(f"caption_extension '{extension}' is an image extension; use .txt (or the extension "
                               f"your caption files have).")
    return text if text.startswith(".") else f".{text}"


def _folder_entries(folder: Path) -> list[os.DirEntry]:
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise IDFuseInputError(f"folder {folder} {what}. Put the person's photos (jpg, png, webp, bmp) in a folder "
                               f"below ComfyUI's input folder and give its name, or give an absolute path.")
    with os.scandir(folder) as entries:
        # Hidden files (.DS_Store, editors' swap files) are nobody's photos: left out without a word.
        return sorted((entry for entry in entries if not entry.name.startswith(".")),
                      key=lambda entry: name_order(entry.name))


def folder_fingerprint(folder: Path) -> str:
    """A hash of the folder's file names, sizes and modification times: changes whenever a photo or caption is
    added, removed, replaced or edited (ComfyUI's IS_CHANGED)."""
    digest = hashlib.sha256(str(folder).encode("utf-8"))
    for entry in _folder_entries(folder):
        stat = entry.stat()
        digest.update(f"\0{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def read_image(path: Path, max_side: int | None = None) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """A photo file -> uint8 RGB [H, W, 3]: EXIF orientation applied, alpha composited over black and grey
    repeated (``rgb_float``, as every face detector of the pack sees a photo), 16-bit scaled to 8; a longer side
    above ``max_side`` (default MAX_PHOTO_SIDE) reduced to it (Lanczos), and then the file's (width, height),
    else None."""
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened)
    if image.mode.startswith("I"):  # 16-bit grey PNGs ("I;16", or "I" in older Pillow)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 65535.0)[..., None]
    else:
        has_alpha = "A" in image.getbands() or "transparency" in image.info
        grey = image.mode in ("1", "L", "LA")
        mode = ("LA" if grey else "RGBA") if has_alpha else ("L" if grey else "RGB")
        array = np.asarray(image.convert(mode), dtype=np.uint8)
        pixels = torch.from_numpy(array.reshape(*array.shape[:2], -1).astype(np.float32) / 255.0)
    rgb = to_uint8(rgb_float(pixels))
    height, width = rgb.shape[:2]
    max_side = MAX_PHOTO_SIDE if max_side is None else max_side
    if max(height, width) <= max_side:
        return torch.from_numpy(rgb), None
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    reduced = np.array(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS), dtype=np.uint8)
    return torch.from_numpy(reduced), (width, height)


def read_caption(path: Path) -> str:
    """A caption file's text, whitespace (line breaks included) collapsed to single spaces."""
    return " ".join(path.read_text(encoding="utf-8-sig").split())


def read_photo_folder(folder: Path, caption_extension: str = DEFAULT_CAPTION_EXTENSION, max_photos: int = 0,
                      on_no_face: str = "error") -> TrainingPhotos:
    """The photos of a folder (jpg/jpeg/png/webp/bmp, any case), sorted by name, each with its caption file when
    there is one; the first ``max_photos`` (0: all). Everything else in the folder, unreadable photos, empty or
    unreadable captions and captions without a photo are skipped and reported, never an error; a folder without
    a readable photo is. ``on_no_face``: what the trainer does with a photo without a face (NO_FACE_ACTIONS)."""
    if on_no_face not in NO_FACE_ACTIONS:
        raise IDFuseInputError(f"on_no_face '{on_no_face}' is not one of {', '.join(NO_FACE_ACTIONS)}.")
    caption_extension = normal_extension(caption_extension)
    entries = _folder_entries(folder)
    if not entries:
        raise IDFuseInputError(f"folder {folder} is empty. Put the person's photos (jpg, png, webp, bmp) in it, with "
                               f"an optional caption file beside each (photo.jpg + photo{caption_extension}).")
    skipped: list[SkippedFile] = []
    photo_entries, captions = [], {}
    for entry in entries:
        extension = os.path.splitext(entry.name)[1].lower()
        if entry.is_dir():
            skipped.append(SkippedFile(entry.name, "a folder (photos in subfolders are not read)"))
        elif extension in IMAGE_EXTENSIONS:
            photo_entries.append(entry)
        elif extension == caption_extension:
            stem = os.path.splitext(entry.name)[0]
            if stem in captions:  # a.txt and a.TXT
                skipped.append(SkippedFile(entry.name, f"a second caption of {stem} ({captions[stem].name} is used)"))
            else:
                captions[stem] = entry
        else:
            skipped.append(SkippedFile(entry.name, f"not a photo ({extension or 'no extension'}; photos are "
                                                   f"{', '.join(IMAGE_EXTENSIONS)})"))
    photos: list[TrainingPhoto] = []
    notes: list[str] = []
    read_captions: dict[str, str | None] = {}  # stem -> caption (None: unusable), each file read once
    for entry in photo_entries:
        if max_photos and len(photos) == max_photos:
            skipped.append(SkippedFile(entry.name, f"beyond max_photos {max_photos}"))
            continue
        try:
            pixels, file_size = read_image(Path(entry.path))
        except Exception as error:  # noqa: BLE001  (any decoder failure: the photo is reported and skipped)
            skipped.append(SkippedFile(entry.name, f"unreadable ({type(error).__name__}: {error})"))
            continue
        stem = os.path.splitext(entry.name)[0]
        caption_entry = captions.get(stem)
        if caption_entry is None:
            photos.append(TrainingPhoto(entry.name, pixels, file_size=file_size))
            continue
        if stem in read_captions:
            if read_captions[stem] is not None:
                notes.append(f"{caption_entry.name} is the caption of {entry.name} too (photos of one name, "
                             f"several extensions).")
        else:
            read_captions[stem], problem = _caption_of(Path(caption_entry.path))
            if problem:
                skipped.append(SkippedFile(caption_entry.name, f"{problem}; photo(s) named {stem} use the shared "
                                                               f"templates"))
        caption = read_captions[stem]
        photos.append(TrainingPhoto(entry.name, pixels, caption, caption_entry.name if caption else None, file_size))
    photo_stems = {os.path.splitext(entry.name)[0] for entry in photo_entries}
    skipped += [SkippedFile(entry.name, "a caption without a photo of that name")
                for stem, entry in captions.items() if stem not in photo_stems]
    skipped.sort(key=lambda item: name_order(item.name))
    if not photos:
        found = "; ".join(f"{item.name}: {item.reason}" for item in skipped[:8])
        raise IDFuseInputError(f"folder {folder} has no readable photo ({found}{'; ...' if len(skipped) > 8 else ''})."
                               f" Put the person's photos (jpg, png, webp, bmp) in it.")
    result = TrainingPhotos(str(folder), tuple(photos), tuple(skipped),
                            caption_extension, on_no_face, tuple(notes))
    log.info("Read %d training photo(s) from %s (%d with a caption, %d file(s) skipped)", len(photos), folder,
             sum(p.caption is not None for p in photos), len(skipped))
    return result


def _caption_of(path: Path) -> tuple[str | None, str | None]:
    """(caption, None), or (None, why it cannot be used)."""
    try:
        text = read_caption(path)
    except (OSError, UnicodeDecodeError) as error:
        return None, f"unreadable caption ({type(error).__name__}: {error})"
    if not text:
        return None, "empty caption"
    if text.count(PLACEHOLDER_MARK) > 1:
        return None, f"{PLACEHOLDER_MARK} written {text.count(PLACEHOLDER_MARK)} times (once: where the person goes)"
    return text, None


# --- captions -> prompt templates ----------------------------------------------------------------------------


def caption_template(caption: str, placeholder: str | None = None, caption_file: str | None = None) -> str:
    """A caption as a prompt template with ``{}`` once, where the identity's placeholder goes:

    - ``{}`` in the caption marks the place (``"{} smiling on a beach"``);
    - else the caption's own mention of the placeholder word (whole word, any case: ``"sks smiling"``, the
      trigger-word captions other trainers use) becomes ``{}``;
    - else the placeholder is put in front: ``"{}, " + caption``.

    The trainer's templates need the placeholder exactly once: a caption with ``{}`` and the word, or the word
    twice, is an error naming the caption file."""
    where = f"Caption {caption_file}" if caption_file else f"Caption '{caption}'"
    mentions = [] if not placeholder else list(re.finditer(rf"(?<!\w){re.escape(placeholder)}(?!\w)", caption,
                                                           flags=re.IGNORECASE))
    marks = caption.count(PLACEHOLDER_MARK)
    if marks > 1:
        raise TrainingError(f"{where} has {PLACEHOLDER_MARK} {marks} times; write it once, where the person goes.")
    if mentions and (marks or len(mentions) > 1):
        raise TrainingError(f"{where} names the person {marks + len(mentions)} times ('{placeholder}'"
                            f"{' and ' + PLACEHOLDER_MARK if marks else ''}); the placeholder must appear once. "
                            f"Keep one '{placeholder}' or one {PLACEHOLDER_MARK}.")
    if marks:
        return caption
    if mentions:
        found = mentions[0]
        return caption[:found.start()] + PLACEHOLDER_MARK + caption[found.end():]
    return f"{PLACEHOLDER_MARK}, {caption}"


# --- the report and the preview -----------------------------------------------------------------------------


def aspect_text(width: int, height: int) -> str:
    ratio = width / height
    shape = "square" if abs(ratio - 1) < 0.02 else "landscape" if ratio > 1 else "portrait"
    return f"{ratio:.2f}:1 {shape}"


def contact_sheet(photos: Sequence[TrainingPhoto], side: int = THUMBNAIL_SIDE, columns: int = PREVIEW_COLUMNS
                  ) -> torch.Tensor:
    """The photos as thumbnails (aspect kept, on grey) in a grid, each with its number, file name and caption
    (or "no caption"): an IMAGE [1, H, W, 3]."""
    from PIL import Image, ImageDraw, ImageOps

    from ..faces.preview import label_font, wrap_label

    font = label_font(max(10, round(side / 18)))
    line_height = round(font.size * 1.25) if hasattr(font, "size") else 12
    text_height = line_height * (1 + CAPTION_LINES) + 6
    columns = max(1, min(columns, len(photos)))
    rows = (len(photos) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * side, rows * (side + text_height)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for index, photo in enumerate(photos):
        left, top = (index % columns) * side, (index // columns) * (side + text_height)
        # Fitted to the cell, aspect kept (small photos enlarged too, so every face can be seen).
        thumbnail = ImageOps.contain(Image.fromarray(photo.pixels.numpy()), (side - 4, side - 4),
                                     Image.Resampling.LANCZOS)
        draw.rectangle([left + 1, top + 1, left + side - 2, top + side - 2], fill=(64, 64, 64))
        sheet.paste(thumbnail, (left + (side - thumbnail.width) // 2, top + (side - thumbnail.height) // 2))
        name = wrap_label(draw, f"{index + 1}. {photo.name}", font, side - 8, 1)
        caption = wrap_label(draw, photo.caption, font, side - 8, CAPTION_LINES) if photo.caption else ["no caption"]
        y = top + side + 2
        draw.text((left + 4, y), name[0], font=font, fill=(255, 255, 255))
        for text in caption:
            y += line_height
            draw.text((left + 4, y), text, font=font, fill=(200, 200, 200) if photo.caption else (130, 130, 130))
    return torch.from_numpy(np.array(sheet, dtype=np.uint8)).float()[None] / 255.0
