"""The quality harness bench/quality.py: it refuses clearly when files are missing, its tables and figure, and
one end-to-end run on CPU, in this process, with small random-weight models in memory (the tests' SD1.5-layout
UNet, text encoder and VAE), an IP-Adapter FaceID encoder that fits them, identity tokens, insightface's code on
the tests' synthetic face models, dlib, a tiny random-weight CLIP for CLIP-T (transformers; open_clip where it
imports) and real photos."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

HARNESS = Path(__file__).resolve().parents[1] / "bench" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("idfuse_bench_quality", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def save_photo(rgb: np.ndarray, path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    """Small stand-ins for every file the harness checks (contents are not read before the checks pass)."""
    identity = tmp_path / "alice"
    save_photo(np.full((32, 32, 3), 128, np.uint8), identity / "1.png")
    paths = {"identity": identity, "checkpoint": tmp_path / "model.safetensors", "clip": tmp_path / "clip.bin",
             "tokens": tmp_path / "alice.safetensors", "out": tmp_path / "out"}
    for name in ("checkpoint", "clip", "tokens"):
        paths[name].write_bytes(b"x")
    return paths


def arguments(files: dict[str, Path], **changes) -> list[str]:
    values = {"--checkpoint": files["checkpoint"], "--identity": files["identity"], "--clip-weights": files["clip"],
              "--out": files["out"], **changes}
    argv = []
    for flag, value in values.items():
        if value is not None:
            argv += [flag, str(value)]
    return argv


@pytest.mark.parametrize(("change", "message"), [
    ({"--checkpoint": "missing.safetensors"}, r"checkpoint not found: missing.safetensors. Pass --checkpoint"),
    ({"--checkpoint": None}, r"checkpoint not found: \(none given\). Pass --checkpoint"),
    ({"--clip-weights": "no-clip.bin"}, r"open_clip weights of ViT-H-14 not found: no-clip.bin. Pass --clip-weights"),
    ({"--clip-library": "transformers", "--clip-weights": "no-clip"},
     r"transformers CLIP model folder not found: no-clip \(no config.json in it\). Pass --clip-weights <folder"),
    ({"--tokens": "gone.safetensors"}, r"identity-token file not found: gone.safetensors. Pass --tokens"),
    ({"--id-encoder": "faceid.bin"}, r"ID encoder not found: faceid.bin. Pass --id-encoder"),
    ({"--prompts": "none.txt"}, r"prompts file not found: none.txt"),
    ({"--identity": "nobody"}, r"identity folder not found: nobody. Pass --identity"),
])
def test_missing_files_are_refused_with_exit_code_2(quality, files, capsys, change, message):
    assert quality.main(arguments(files, **change)) == 2
    error = capsys.readouterr().err
    assert error.startswith("quality.py: ") and __import__("re").search(message, error), error
    assert not files["out"].exists()  # refused before anything is loaded or written


def test_unusable_inputs_are_refused(quality, files, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert quality.main(arguments(files, **{"--identity": empty})) == 2
    assert "holds no photos" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo on the beach\n", encoding="utf-8")
    assert quality.main(arguments(files, **{"--prompts": prompts})) == 2
    assert "needs the placeholder {}" in capsys.readouterr().err
    encoder = tmp_path / "faceid.bin"
    encoder.write_bytes(b"x")
    assert quality.main(arguments(files, **{"--id-encoder": encoder})) == 2
    assert "--id-encoder needs --face-backend" in capsys.readouterr().err
    argv = arguments(files) + ["--identity", str(files["identity"]), "--tokens", str(files["tokens"])]
    assert quality.main(argv) == 2
    assert "1 --tokens file(s) for 2 --identity folder(s)" in capsys.readouterr().err


@pytest.mark.parametrize("library", ["open_clip", "transformers"])
def test_a_clip_library_that_cannot_import_is_refused(quality, files, capsys, monkeypatch, library):
    monkeypatch.setitem(sys.modules, library, None)  # import fails, as where the package is not installed
    clip_weights = files["clip"]
    if library == "transformers":  # a folder that passes the file check
        clip_weights = files["out"].parent / "clip-folder"
        clip_weights.mkdir()
        (clip_weights / "config.json").write_text("{}", encoding="utf-8")
    argv = arguments(files, **{"--clip-library": library, "--clip-weights": clip_weights})
    assert quality.main(argv) == 2
    error = capsys.readouterr().err
    assert f"{library} cannot be imported" in error and f"CLIP-T with --clip-library {library} needs it: pip install" \
        in error, error
    assert not files["out"].exists()


def test_default_prompts_cover_the_papers_kinds(quality):
    text = quality.DEFAULT_PROMPTS.read_text(encoding="utf-8")
    prompts = quality.read_prompts(quality.DEFAULT_PROMPTS, 0)
    assert len(prompts) >= 20 and all(p.count("{}") == 1 for p in prompts) and len(set(prompts)) == len(prompts)
    for kind in ("# scenes", "# actions", "# attributes", "# styles"):
        assert kind in text


def test_summary_table_and_figure(quality, tmp_path):
    from PIL import Image

    record = quality.Record
    scores = {"same": {"similarity": 0.8, "faces": 1, "distance": 0.4, "same_person": True}}
    none = {"same": {"similarity": 0.0, "faces": 0, "distance": None, "same_person": None}}
    records = [record("plain", "", "alice", 0, "a photo of a person", 0, "images/a.png", 1.0, 30.0, none),
               record("tokens", "strength=1", "alice", 0, "a photo of a person", 0, "images/b.png", 1.0, 20.0, scores),
               record("tokens", "strength=1", "alice", 1, "a photo of a person", 0, "images/c.png", 1.0, 24.0, none)]
    summary = quality.summarise(records, ["same"])
    plain, tokens = summary
    assert plain == {"method": "plain", "setting": "", "images": 1, "clip_t": 30.0, "identity[same]": 0.0,
                     "face_rate[same]": 0.0}
    assert tokens["identity[same]"] == pytest.approx(0.4) and tokens["clip_t"] == pytest.approx(22.0)
    assert tokens["face_rate[same]"] == 0.5 and tokens["same_person_rate[same]"] == 1.0  # of the images with a face

    quality.write_csv(tmp_path / "r.csv", records, ["same"])
    with open(tmp_path / "r.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and rows[1]["same similarity"] == "0.8" and rows[1]["same same person"] == "yes"
    assert rows[0]["same distance"] == "" and rows[2]["clip_t"] == "24.0000"

    quality.draw_tradeoff(tmp_path / "t.png", summary, ["same"])
    figure = np.asarray(Image.open(tmp_path / "t.png").convert("RGB")).astype(int)
    for method in ("plain", "tokens"):  # each method's point is drawn in its colour
        colour = np.array(quality.METHOD_COLOURS[method])
        assert (np.abs(figure - colour).max(axis=-1) == 0).sum() > 30


# --- end to end on random weights ------------------------------------------------------------------------------


TINY_OPEN_CLIP = {"embed_dim": 32,
                  "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def small_models(quality, tokenizer_dir):
    """The tests' SD1.5-layout UNet, text encoder and VAE with random weights, in memory (no checkpoint file)."""
    from factories import make_clip, make_model, tiny_vae

    return quality.InMemoryModels(quality.LoadedModels(make_model("sd15"), make_clip("sd15", tokenizer_dir),
                                                       tiny_vae()))


def transformers_clip_folder(folder: Path, tokenizer_dir: Path) -> list[str]:
    """A tiny random-weight transformers CLIP (the real tokenizer, 32 px images) saved as a local model folder."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    narrow = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1}
    config = transformers.CLIPConfig(text_config={**narrow, "max_position_embeddings": 77, "vocab_size": 49408},
                                     vision_config={**narrow, "image_size": 32, "patch_size": 16}, projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(folder)
    tokenizer = transformers.CLIPTokenizer(vocab_file=str(tokenizer_dir / "vocab.json"),
                                           merges_file=str(tokenizer_dir / "merges.txt"), model_max_length=77)
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return ["--clip-library", "transformers", "--clip-weights", str(folder)]


def open_clip_files(folder: Path) -> list[str]:
    """A tiny random-weight open_clip model: its config and a state-dict file, passed as the local weights."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip cannot be imported here (pip install "
                                                        "open_clip_torch; it needs a torchvision matching torch); "
                                                        "the transformers run covers CLIP-T")
    import torch

    config = folder / "idfuse-tiny-clip.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP), encoding="utf-8")
    open_clip.add_model_config(config)
    torch.save(open_clip.create_model("idfuse-tiny-clip", pretrained=None).state_dict(), folder / "tiny-clip.pt")
    return ["--clip-library", "open_clip", "--clip-model", "idfuse-tiny-clip", "--clip-config", str(config),
            "--clip-weights", str(folder / "tiny-clip.pt")]


@pytest.mark.parametrize("clip_library", ["transformers", "open_clip"])
def test_harness_runs_end_to_end_on_random_weights(quality, small_models, tokenizer_dir, tmp_path, capsys,
                                                   clip_library):
    for module in ("insightface", "onnxruntime", "onnx", "cv2", "skimage"):
        pytest.importorskip(module, reason=f"the harness test scores faces with insightface's code ({module})")
    import onnx_faces
    from factories import make_id_tokens
    from ip_adapter_files import FITS_TEST_UNETS, write_faceid
    from PIL import Image

    from comfyui_idfuse.models.faces.dlib import DlibBackend

    clip_arguments = (transformers_clip_folder(tmp_path / "clip", tokenizer_dir) if clip_library == "transformers"
                      else open_clip_files(tmp_path))
    faces = tmp_path / "insightface"
    onnx_faces.write_model_pack(faces, "buffalo_l")
    write_faceid(tmp_path / "ip-adapter-faceid_sd15.bin", "faceid", "sd15", FITS_TEST_UNETS)  # fits small_models
    make_id_tokens("sd15", num_stages=1).save(tmp_path / "alice.safetensors")
    face = onnx_faces.aligned_crop(onnx_faces.astronaut(), onnx_faces.ASTRONAUT_KPS)
    canvas = np.full((512, 512, 3), 128, np.uint8)
    canvas[144:368, 144:368] = np.asarray(Image.fromarray(face).resize((224, 224)))
    save_photo(canvas, tmp_path / "alice" / "wall.png")
    save_photo(onnx_faces.astronaut(), tmp_path / "alice" / "astronaut.jpg")
    out = tmp_path / "out"

    argv = ["--identity", str(tmp_path / "alice"), "--tokens", str(tmp_path / "alice.safetensors"),
            "--id-encoder", str(tmp_path / "ip-adapter-faceid_sd15.bin"), "--face-backend", "buffalo_l",
            "--face-models", str(faces), *clip_arguments, "--max-prompts", "1", "--seeds", "0",
            "--id-weights", "0.5", "1.0", "--steps", "1", "--size", "64", "--out", str(out)]
    assert quality.main(argv, models=small_models) == 0, capsys.readouterr().err[-4000:]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["config"]["models"] == "InMemoryModels" and results["config"]["clip_library"] == clip_library
    records = results["records"]
    # 1 prompt x 1 seed: plain, tokens, Infinite-ID at two id_weights
    assert sorted({(r["method"], r["setting"]) for r in records}) == [
        ("infinite_id", "id_weight=0.5"), ("infinite_id", "id_weight=1"), ("plain", ""), ("tokens", "strength=1")]
    assert len(records) == 4 and summary["images"] == 4 and summary["records"] == 4
    backends = results["config"]["scoring_backends"]
    assert backends["buffalo_l"] == "arcface-w600k-512"
    if DlibBackend.missing_dependencies() is None:  # dlib scores too (its own embedding space)
        assert "dlib-resnet-128" in backends.values()
    for record in records:
        assert math.isfinite(record["clip_t"]) and -100 <= record["clip_t"] <= 100
        assert set(record["identity_scores"]) == set(backends)
        assert (out / record["image"]).is_file()
        assert all(math.isfinite(s["similarity"]) for s in record["identity_scores"].values())
    assert len({r["clip_t"] for r in records}) > 1  # CLIP-T looked at each image
    assert "{}" not in records[0]["prompt"] and "a person" in records[0]["prompt"]
    images = {r["image"] for r in records}
    assert len(images) == 4  # every method and setting made its own image
    pixels = [np.asarray(Image.open(out / image)) for image in sorted(images)]
    assert all(p.shape == (64, 64, 3) for p in pixels) and len({p.tobytes() for p in pixels}) == 4
    with open(out / "results.csv", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert (out / "tradeoff.png").stat().st_size > 1000
    assert {row["method"] for row in results["summary"]} == {"plain", "tokens", "infinite_id"}
