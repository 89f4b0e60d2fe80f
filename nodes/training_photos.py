"""IDFuse Load Training Photos: a folder of photos of the person, with optional captions, for IDFuse Train Identity
(models/training/photo_folder.py; the crops around the face: nodes/glue/training_photos.py)."""

from __future__ import annotations

from ..models.training.photo_folder import DEFAULT_CAPTION_EXTENSION, IMAGE_EXTENSIONS, NO_FACE_ACTIONS
from .glue.training_photos import folder_state, load_training_photos
from .train import CATEGORY, PHOTOS_TYPE


class IDFuseLoadTrainingPhotos:
    DESCRIPTION = ("Reads a folder of photos of the person for IDFuse Train Identity (its training_photos input): "
                   f"{', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)} of any size and aspect, sorted by name, "
                   "EXIF rotation applied. The trainer crops each to a square around the face at its resolution, "
                   "never squashed. A caption file beside a photo (me.jpg + me.txt) replaces the prompt templates "
                   "for that photo: {} marks where the person goes, else the placeholder is put in front. "
                   "Everything it cannot use is skipped and listed in the report.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (PHOTOS_TYPE, "IMAGE", "STRING")
    RETURN_NAMES = ("training_photos", "preview", "report")
    OUTPUT_TOOLTIPS = (
        "The photos and their captions; connect to IDFuse Train Identity's training_photos (instead of images).",
        "The photos as thumbnails, each with its number, file name and caption: what will be trained.",
        "Each photo with its size and aspect and its caption's template, then every skipped file with why.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {"default": "", "placeholder": "my_person", "tooltip": (
                "A folder below ComfyUI's input folder (my_person for input/my_person), or an absolute path. "
                "Subfolders are not read.")}),
            "max_photos": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": (
                "Use only the first this many photos (by name); 0 = all.")}),
            "caption_extension": ("STRING", {"default": DEFAULT_CAPTION_EXTENSION, "tooltip": (
                "Caption files are <photo name><this> beside each photo. In a caption, {} marks where the person "
                "goes; the trainer's placeholder word written in the caption counts too; else the placeholder is "
                "put in front ('{}, ' + caption). Photos without a caption use the prompt templates.")}),
            "on_no_face": (list(NO_FACE_ACTIONS), {"default": NO_FACE_ACTIONS[0], "tooltip": (
                "A photo in which the trainer's face detector finds no face: an error naming it, or leave it out "
                "of training (a warning names it).")}),
        }}

    @classmethod
    def IS_CHANGED(cls, folder: str, **_settings) -> str:
        return folder_state(folder)  # names, sizes, modification times: read again when a file changes

    def load(self, folder: str, max_photos: int = 0, caption_extension: str = DEFAULT_CAPTION_EXTENSION,
             on_no_face: str = NO_FACE_ACTIONS[0]):
        return load_training_photos(folder, max_photos, caption_extension, on_no_face)


NODE_CLASS_MAPPINGS = {"IDFuseLoadTrainingPhotos": IDFuseLoadTrainingPhotos}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFuseLoadTrainingPhotos": "IDFuse Load Training Photos"}
