"""IDFuse Identity Score: how close the faces of generated images are to the person (models/faces/scoring.py)."""

from __future__ import annotations

import torch

from ..models.faces import as_face_backend
from ..models.faces.scoring import reference_from_inputs, score_images, score_previews
from ..models.faces.types import FaceEmbedding
from .faces import CATEGORY


class IDFuseIdentityScore:
    DESCRIPTION = ("Scores how much each generated image looks like the person: finds every face with the connected "
                   "face analysis, embeds it and compares it with the reference (photos of the person, or the "
                   "ID_EMBEDS of IDFuse Face Embed made with the same face analysis). The score is the cosine "
                   "similarity of the best-matching face (0 when no face is found); with the dlib backend the "
                   "Euclidean distance is given too (same person below 0.6). Outputs one score per image, a table "
                   "best first, previews with each face boxed and scored, and the images, best first if asked.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOAT", "STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("scores", "table", "preview", "images")
    # One FLOAT per image: downstream nodes run once per score, as with any ComfyUI list output.
    OUTPUT_IS_LIST = (True, False, False, False)
    OUTPUT_TOOLTIPS = (
        "One score per image (in the order of the images output): the best face's cosine similarity with the "
        "reference, 0 for an image without a face.",
        "A text table, best first: image number in the batch, faces found, similarity (and with dlib the distance "
        "and whether it is the same person), the best face's box.",
        "The images (in the order of the images output) with every face boxed, the best match in green, and its "
        "score written on it; 'no face' in red where none was found.",
        "The input images, best first when sort is on, else in their batch order.",
    )
    FUNCTION = "score"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The generated images to score (a batch)."}),
                "face_analysis": ("FACE_ANALYSIS", {
                    "tooltip": "From IDFuse Load Face Analysis: finds and embeds the faces of images and reference "
                               "photos. An ID_EMBEDS reference must come from the same kind of face analysis."}),
                "sort": ("BOOLEAN", {
                    "default": True, "label_on": "best first", "label_off": "batch order",
                    "tooltip": "Output the images, scores and previews best first (images without a face last), "
                               "to keep the closest of a batch; off keeps the batch order. The table is always "
                               "best first."}),
            },
            "optional": {
                "reference_images": ("IMAGE", {
                    "tooltip": "Photos of the person (the largest face of each is used; photos without a face are "
                               "left out). Connect this or id_embeds, not both."}),
                "id_embeds": ("ID_EMBEDS", {
                    "tooltip": "The person's identity from IDFuse Face Embed, made with the same face analysis "
                               "(same embedding space). Connect this or reference_images, not both."}),
            },
        }

    def score(self, images: torch.Tensor, face_analysis, sort: bool, reference_images: torch.Tensor | None = None,
              id_embeds: FaceEmbedding | None = None) -> tuple[list[float], str, torch.Tensor, torch.Tensor]:
        backend = as_face_backend(face_analysis)
        reference = reference_from_inputs(backend, reference_images, id_embeds)
        batch, photos = score_images(backend, images, reference)
        order = batch.order if sort else list(range(len(batch.scores)))
        batch_images = images if images.ndim == 4 else images[None]
        return ([batch.scores[i].similarity for i in order], batch.table(), score_previews(photos, batch, order),
                batch_images[torch.tensor(order, dtype=torch.long)])


NODE_CLASS_MAPPINGS = {"IDFuseIdentityScore": IDFuseIdentityScore}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFuseIdentityScore": "IDFuse Identity Score"}
