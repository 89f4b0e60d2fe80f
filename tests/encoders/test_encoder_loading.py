"""Loading the ID encoder for a run: whole, even where ComfyUI's model management would load it partially
(low VRAM), so that encoding never mixes devices."""

from __future__ import annotations

import inspect
import uuid

import comfy.model_management as mm
import pytest
import torch
from ip_adapter_files import FITS_TEST_UNETS, write_faceid

from comfyui_idfuse.nodes.encoders import IDFuseLoadIDEncoder
from comfyui_idfuse.nodes.glue.id_encoders import load_fully
from comfyui_idfuse.nodes.glue.infinite_id import id_layers


def fresh_encoder():
    """A newly loaded ID_ENCODER (a patcher model management has not seen)."""
    import folder_paths

    name = f"ip-adapter-faceid_sd15_{uuid.uuid4().hex[:8]}.bin"
    write_faceid(f"{folder_paths.get_folder_paths('ipadapter')[0]}/{name}", "faceid", "sd15", FITS_TEST_UNETS)
    return IDFuseLoadIDEncoder().load(f"ipadapter/{name}")[0]


@pytest.fixture()
def short_of_vram(monkeypatch):
    """Model management as on a GPU with little free memory: the load device counts as a GPU in low-VRAM mode,
    almost nothing is free and every module weighs 10,000 times its size, so a plain load_models_gpu loads only
    part of the encoder (whatever ComfyUI's minimum budget)."""
    real_size = mm.module_size
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.LOW_VRAM)
    monkeypatch.setattr(mm, "lowvram_available", True)
    monkeypatch.setattr(mm, "is_device_cpu", lambda device: False)
    monkeypatch.setattr(mm, "get_free_memory",
                        lambda *args, torch_free_too=False, **kwargs: (1024 ** 2, 0) if torch_free_too else 1024 ** 2)
    monkeypatch.setattr(mm, "module_size", lambda module: 10_000 * real_size(module))
    yield
    mm.unload_all_models()  # nothing loaded under these sizes stays loaded for later tests


def test_the_forced_partial_load_is_partial_without_a_full_load(short_of_vram):
    encoder = fresh_encoder()
    mm.load_models_gpu([encoder.patcher])
    assert encoder.patcher.loaded_size() < encoder.patcher.model_size(), "the setting no longer forces a partial load"


def test_the_encoder_is_loaded_whole_when_vram_is_short(short_of_vram):
    encoder = fresh_encoder()
    layers = id_layers(encoder, _embeds(), "sd15")
    assert encoder.patcher.loaded_size() == encoder.patcher.model_size()
    device = torch.device(encoder.patcher.load_device)
    assert all(t.device == device for t in [*encoder.encoder.parameters(), *encoder.encoder.buffers()])
    assert all(torch.isfinite(t).all() for kv in layers.values() for t in vars(kv).values())


def test_a_comfyui_without_force_full_load_still_loads(monkeypatch):
    calls: list[tuple] = []

    def old_load_models_gpu(models, memory_required=0):
        calls.append(tuple(models))

    assert "force_full_load" in inspect.signature(mm.load_models_gpu).parameters  # what the real one has
    monkeypatch.setattr(mm, "load_models_gpu", old_load_models_gpu)
    encoder = fresh_encoder()
    assert load_fully(encoder) == torch.device(encoder.patcher.load_device)
    assert calls == [(encoder.patcher,)]


def _embeds():
    from comfyui_idfuse.models.faces.types import ARCFACE_W600K_512, FaceEmbedding

    face = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(0)), dim=-1)
    return FaceEmbedding(arcface=face, clip_hidden=None, per_photo_arcface=face, boxes=torch.zeros(1, 4),
                         keypoints=torch.zeros(1, 5, 2), embedding_space=ARCFACE_W600K_512)
