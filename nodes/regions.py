"""IDFuse Region Masks: one MASK per person, for IDFuse Combine ID Tokens (and the Infinite-ID embeds)."""

from __future__ import annotations

import torch

from ..models.errors import IDFuseInputError
from ..models.tokens.regions import SPLIT_LAYOUTS, split_regions
from .glue.id_encoding import layout_face_masks

FACES_LAYOUT = "faces in layout_image"
MAX_REGIONS = 4


class IDFuseRegionMasks:
    DESCRIPTION = ("Makes one region mask per person: the cells of a simple split (left | right, top | bottom, "
                   "thirds, a 2 x 2 grid) of the given size, or the face of each person found in a layout picture "
                   "(left to right). Connect region_1, region_2... to the masks of IDFuse Combine ID Tokens, so "
                   "each identity acts only in its own region.")
    CATEGORY = "IDFuse/identity tokens"
    RETURN_TYPES = ("MASK",) * MAX_REGIONS
    RETURN_NAMES = tuple(f"region_{i + 1}" for i in range(MAX_REGIONS))
    OUTPUT_TOOLTIPS = tuple(f"Region {i + 1} (1 = inside), counted left to right, then top to bottom; empty when "
                            f"the layout has fewer regions." for i in range(MAX_REGIONS))
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "layout": ([*SPLIT_LAYOUTS, FACES_LAYOUT], {
                "tooltip": "How the picture is divided. 'faces in layout_image' finds the faces of the layout_image "
                           "input and gives each its face (an ellipse a little larger than the detector's box)."}),
            "width": ("INT", {"default": 1024, "min": 8, "max": 16384, "step": 8,
                              "tooltip": "Mask width in pixels (use the image's); ignored with a layout_image."}),
            "height": ("INT", {"default": 1024, "min": 8, "max": 16384, "step": 8,
                               "tooltip": "Mask height in pixels; ignored with a layout_image."}),
        }, "optional": {
            "layout_image": ("IMAGE", {"tooltip": "A picture with the people where they should be (a sketch, a "
                                                  "photo). Needed by 'faces in layout_image'; it sets the size."}),
            "face_analysis": ("FACE_ANALYSIS", {"tooltip": "A face backend (IDFuse Load Face Analysis) for the "
                                                "faces layout; without it the built-in dlib HOG detector is used."}),
        }}

    def make(self, layout: str, width: int, height: int, layout_image: torch.Tensor | None = None,
             face_analysis=None):
        if layout_image is not None:
            height, width = int(layout_image.shape[-3]), int(layout_image.shape[-2])
        if layout == FACES_LAYOUT:
            if layout_image is None:
                raise IDFuseInputError("layout 'faces in layout_image' needs the layout_image input: connect a "
                                       "picture with the people where they should be, or choose a split layout.")
            regions = layout_face_masks(layout_image, face_analysis)
        else:
            regions = split_regions(layout, height, width)
        regions = regions[:MAX_REGIONS]
        regions += [torch.zeros(height, width)] * (MAX_REGIONS - len(regions))
        return tuple(region.unsqueeze(0) for region in regions)


NODE_CLASS_MAPPINGS = {"IDFuseRegionMasks": IDFuseRegionMasks}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFuseRegionMasks": "IDFuse Region Masks"}
