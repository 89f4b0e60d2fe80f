"""Word positions, the record's reduction and run handling, and the row selection (no UNet needed)."""

from __future__ import annotations

import pytest
import torch

from comfyui_idfuse.models.attention_maps.layers import LAYER_SETS, layers_of
from comfyui_idfuse.models.attention_maps.record import AttentionRecord
from comfyui_idfuse.models.attention_maps.recorder import recorded_rows
from comfyui_idfuse.models.attention_maps.words import (
    WordPositions,
    find_positions,
    parse_words,
    word_columns,
    word_positions,
)
from comfyui_idfuse.models.errors import IDFuseInputError


def test_parse_words():
    assert parse_words(" sks, zwx ,, sks,red hat ") == ["sks", "zwx", "red hat"]
    assert parse_words("  ") == []


def test_positions_every_occurrence_multi_token_and_later_chunks():
    chunks = [[49406, 1, 2, 3, 2, 3, 49407], [49406, 5, 2, 3, "embedding", 49407, 49407]]
    assert find_positions(chunks, [2, 3]) == (2, 3, 4, 5, 9, 10)
    assert find_positions(chunks, [5]) == (8,)
    assert find_positions(chunks, [9]) == ()
    with pytest.raises(IDFuseInputError, match="'hat'"):
        word_positions(chunks, [("sks", [5]), ("hat", [9])])


def test_word_columns_count_each_repeat_of_the_prompt():
    words = (WordPositions("a", (1,)), WordPositions("b", (2, 3)))
    columns = word_columns(words, prompt_length=4, context_length=8)
    expected = torch.zeros(8, 2)
    expected[[1, 5], 0] = 1
    expected[[2, 3, 6, 7], 1] = 1
    assert torch.equal(columns, expected)
    assert word_columns(words, prompt_length=4, context_length=6) is None


def test_recorded_rows_positive_chunks_and_two_streams():
    one = recorded_rows([1, 0], batch=4)
    assert one.batch_rows.tolist() == [2, 3] and one.record_rows.tolist() == [0, 1] and one.rows == 2
    # Two streams, 2 images: chunk = [text0, text1, id0, id1]; the record keeps the ID stream first.
    two = recorded_rows([0, 1], batch=8, streams=2)
    assert two.batch_rows.tolist() == [2, 3, 0, 1] and two.record_rows.tolist() == [0, 1, 2, 3]
    assert two.rows == 4 and two.streams == 2
    assert recorded_rows([1], batch=2) is None


def record(words=("a", "b")):
    return AttentionRecord([WordPositions(w, (i + 1,)) for i, w in enumerate(words)], 77, (), 10.0, 1.0)


def test_record_averages_layers_and_steps_with_upsampling():
    rec = record()
    small = torch.rand(1, 2, 2, 2)
    large = torch.rand(1, 2, 4, 4)
    for sigma in (8.0, 5.0):
        assert rec.begin_call(sigma)
        rec.add((2, 2), small * sigma, torch.tensor([0]), 1, 1, sigma)
        rec.add((4, 4), large, torch.tensor([0]), 1, 1, sigma)
    up = torch.nn.functional.interpolate
    expected = (up(small * 8, size=(8, 8), mode="bilinear") + up(small * 5, size=(8, 8), mode="bilinear")
                + 2 * up(large, size=(8, 8), mode="bilinear")) / 4
    assert torch.allclose(rec.maps((8, 8)), expected, atol=1e-6)
    assert rec.steps == 2


def test_record_window_and_new_run():
    rec = record()
    assert not rec.begin_call(12.0)  # above sigma_start
    assert rec.begin_call(6.0)
    rec.add((2, 2), torch.ones(1, 2, 2, 2), torch.tensor([0]), 1, 1, 6.0)
    assert rec.begin_call(6.0)  # the negative's call at the same sigma: same run
    assert rec.recorded
    assert not rec.begin_call(0.5)  # below sigma_end
    assert rec.recorded
    assert not rec.begin_call(12.0)  # higher than before: a new run starts, the old maps are gone
    assert not rec.recorded
    with pytest.raises(IDFuseInputError, match="empty"):
        rec.maps((4, 4))


def test_record_keeps_one_row_layout_per_run():
    rec = record()
    rec.begin_call(5.0)
    assert rec.add((2, 2), torch.ones(2, 2, 2, 2), torch.tensor([0, 1]), 2, 1, 5.0)
    assert not rec.add((2, 2), torch.ones(1, 2, 2, 2), torch.tensor([0]), 1, 1, 5.0)


def test_rows_for_images():
    rec = record()
    rec.begin_call(5.0)
    rec.add((2, 2), torch.ones(4, 2, 2, 2), torch.arange(4), 4, 2, 5.0)
    assert rec.rows_for_images(2).tolist() == [0, 1]  # the ID stream
    assert rec.rows_for_images(4).tolist() == [0, 1, 2, 3]  # both streams (ID first)
    with pytest.raises(IDFuseInputError, match="images holds 3"):
        rec.rows_for_images(3)


def test_layer_sets():
    assert [str(k) for k in layers_of("sd15", "mid-resolution")] == [
        "input.7.0", "input.8.0", "output.3.0", "output.4.0", "output.5.0"]
    assert len(layers_of("sdxl", "all")) == 70 and set(LAYER_SETS) == {"mid-resolution", "trained layers", "all"}
    with pytest.raises(IDFuseInputError, match="layers 'some'"):
        layers_of("sd15", "some")
