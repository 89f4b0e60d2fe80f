"""IDFuse Show Attention Map: heat maps, masks and the shares inside face boxes, on a record made by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_idfuse.models.attention_maps.record import AttentionRecord
from comfyui_idfuse.models.attention_maps.render import box_share, heat_colours, heat_overlay
from comfyui_idfuse.models.attention_maps.words import WordPositions
from comfyui_idfuse.models.errors import IDFuseInputError
from comfyui_idfuse.models.faces.types import DetectedFaces
from comfyui_idfuse.nodes.attention_map import IDFuseShowAttentionMap

show = IDFuseShowAttentionMap().show


class BoxDetector:
    """A face detector that finds the same two boxes (left, right) in every picture."""

    name = "two fixed boxes"

    def detect(self, rgb):
        boxes = np.array([[32, 0, 64, 32], [0, 0, 16, 16]], dtype=np.float32)
        return DetectedFaces.left_to_right(boxes, np.ones(2), None)


def filled_record(images=1):
    """Word 'sks' attends only to the left 16x16 quarter of a 64x64 picture, 'zwx' everywhere alike."""
    record = AttentionRecord([WordPositions("sks", (4,)), WordPositions("zwx", (6,))], 77, (), 10.0, 0.0)
    maps = torch.zeros(images, 2, 4, 4)
    maps[:, 0, 0, 0] = 1.0
    maps[:, 1] = 0.25
    record.begin_call(5.0)
    record.add((4, 4), maps, torch.arange(images), images, 1, 5.0)
    return record


def test_heat_maps_masks_and_shares():
    images = torch.rand(2, 64, 64, 3)
    heat, masks, table = show(filled_record(2), images, 0.6, BoxDetector())
    assert heat.shape == (4, 64, 64, 3) and masks.shape == (4, 64, 64)
    assert masks.amax((1, 2)).tolist() == [1.0] * 4
    assert torch.allclose(masks[2], torch.ones(64, 64))  # zwx: uniform
    assert "face 1" in table and "face 2" in table and "sks" in table and "zwx" in table
    record_maps = filled_record(2).maps((64, 64))
    # The left face (x 0..16, y 0..16) holds sks's single grid cell (bilinear upsampling spreads a little of it
    # past the box), none reaches the right face; zwx spreads by area.
    assert box_share(record_maps[0, 0], (0, 0, 16, 16)) > 0.7
    assert box_share(record_maps[0, 0], (32, 0, 64, 32)) == 0.0
    assert box_share(record_maps[0, 1], (0, 0, 16, 16)) == pytest.approx(1 / 16)
    assert "6.2%" in table or "6.3%" in table


def test_without_face_analysis_and_errors():
    heat, _masks, table = show(filled_record(), torch.rand(1, 32, 48, 3), 0.0)
    assert heat.shape == (2, 32, 48, 3) and "No face analysis" in table
    with pytest.raises(IDFuseInputError, match="images holds 2"):
        show(filled_record(), torch.rand(2, 32, 32, 3), 0.5)
    with pytest.raises(IDFuseInputError, match="attention_record"):
        show("not a record", torch.rand(1, 32, 32, 3), 0.5)
    empty = AttentionRecord([WordPositions("sks", (4,))], 77, (), 10.0, 0.0)
    with pytest.raises(IDFuseInputError, match="no sampling step was recorded"):
        show(empty, torch.rand(1, 32, 32, 3), 0.5)


def test_heat_colours_and_overlay():
    values = torch.tensor([[0.0, 1.0]])
    colours = heat_colours(values)
    assert torch.allclose(colours[0, 1], torch.tensor([1.0, 0.0, 0.0]))  # the peak is red
    image = torch.rand(1, 2, 3)
    assert torch.equal(heat_overlay(image, values, 0.0), image)
    assert torch.allclose(heat_overlay(image, values, 1.0), heat_colours(values))
