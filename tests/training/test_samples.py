"""Sample images during training (IDFuse Training Options' sample_prompts): which steps are sampled, the PNG of
each round and the samples output grid, determinism (the same run gives the same images; sampling changes nothing
that is trained), the pack's own token path with the LoRA being trained, prompt errors, interrupts and resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import comfy.sample
import numpy as np
import pytest
import safetensors.torch
import torch
from factories import make_clip, make_id_tokens, make_model, tiny_vae
from interrupts import interrupt_at
from PIL import Image
from trainer_inputs import face_photos, settings

from comfyui_idfuse.models.errors import IDFuseInputError
from comfyui_idfuse.models.tokens.format import load_id_tokens
from comfyui_idfuse.models.training.sample_grid import MAX_GRID_SIDE, row_label_width
from comfyui_idfuse.models.training.settings import TrainingSettings
from comfyui_idfuse.nodes.glue import training_files
from comfyui_idfuse.nodes.glue.folders import ID_TOKENS_FOLDER, default_folder
from comfyui_idfuse.nodes.glue.training_files import OutputFiles
from comfyui_idfuse.nodes.glue.training_options import parse_sample_prompts
from comfyui_idfuse.nodes.glue.training_samples import SampleRounds, sample_steps_due
from comfyui_idfuse.nodes.tokens import IDFuseEncodeWithID
from comfyui_idfuse.nodes.train import IDFuseTrainIdentity

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLE_SIZE = 64  # below the widget's 256: set on the options directly, the tiny UNet takes 8x8 latents
LABELS = row_label_width(SAMPLE_SIZE)  # the prompts' column left of the grid
PROMPTS = ("a photo of sks", "{} as an astronaut, oil painting")
RENDERED = ("a photo of sks", "sks as an astronaut, oil painting")
SAMPLED = {"steps": 3, "sample_prompts": "\n".join(PROMPTS), "sample_every": 2, "sample_steps": 2, "lora_rank": 2,
           "learning_rate": 0.05}


@pytest.fixture(scope="module")
def parts(tokenizer_dir):
    images, masks = face_photos(2)
    return {"model": make_model("sd15"), "clip": make_clip("sd15", tokenizer_dir), "vae": tiny_vae(),
            "images": images, "masks": masks}


def train(parts, save_name: str, sample_size: int = SAMPLE_SIZE, **changes):
    kwargs = settings(save_name=save_name, **changes)
    kwargs["options"] = {**kwargs["options"], "sample_size": sample_size}
    with torch.inference_mode():  # as ComfyUI runs nodes
        return IDFuseTrainIdentity().train(parts["model"], parts["clip"], parts["vae"], parts["images"],
                                           masks=parts["masks"], **kwargs)


def tokens_dir() -> Path:
    return Path(default_folder(ID_TOKENS_FOLDER))


def samples_dir(save_name: str) -> Path:
    return tokens_dir() / f"{save_name}.samples"


def report_of(outputs) -> dict:
    return json.loads(outputs[5])


class SampleSpy:
    """What each sample render saw: the positive conditioning IDFuse Encode With ID made for it, and the UNet
    layers that carried forward hooks (the trained LoRA's) when ComfyUI's sampler ran."""

    def __init__(self, monkeypatch, unet: torch.nn.Module):
        self.conditionings: list[tuple[str, list]] = []
        self.hooked_layers: list[set[str]] = []
        encode, sample = IDFuseEncodeWithID.encode, comfy.sample.sample

        def spying_encode(node, clip, id_tokens, text):
            result = encode(node, clip, id_tokens, text)
            self.conditionings.append((text, result[0]))
            return result

        def spying_sample(*args, **kwargs):
            self.hooked_layers.append({name for name, m in unet.named_modules() if m._forward_hooks})
            return sample(*args, **kwargs)

        monkeypatch.setattr(IDFuseEncodeWithID, "encode", spying_encode)
        monkeypatch.setattr(comfy.sample, "sample", spying_sample)


@pytest.fixture(scope="module")
def runs(parts):
    """The same run with sample images (twice, for determinism) and without.

    ComfyUI's CPU attention (sub-quadratic) and its batching of conds choose chunk sizes from the free memory,
    which changes the order of float sums: the free memory the runs see is fixed, so a machine busy with other
    work cannot make two identical runs differ in their last bits."""
    import comfy.model_management

    def fixed_free_memory(dev=None, torch_free_too=False):
        free = 8 * 1024 ** 3
        return (free, free) if torch_free_too else free

    with pytest.MonkeyPatch.context() as fixed:
        fixed.setattr(comfy.model_management, "get_free_memory", fixed_free_memory)
        with pytest.MonkeyPatch.context() as monkeypatch:
            spy = SampleSpy(monkeypatch, parts["model"].model.diffusion_model)
            sampled = train(parts, "samples_a", **SAMPLED)
        again = train(parts, "samples_b", **SAMPLED)
        plain = train(parts, "samples_none", **{**SAMPLED, "sample_prompts": ""})
    return {"sampled": sampled, "again": again, "plain": plain, "spy": spy}


def test_sampled_steps_are_every_n_and_the_last():
    def due(steps: int, every: int) -> list[int]:
        run = TrainingSettings(steps=steps, sample_every=every)
        return [step for step in range(steps + 1) if sample_steps_due(run, step)]

    assert due(5, 2) == [2, 4, 5]
    assert due(6, 2) == [2, 4, 6]  # the last step once
    assert due(5, 10) == [5]
    assert due(5, 0) == []
    assert due(1, 1) == [1]


def test_each_round_is_a_png_and_the_output_is_a_grid_of_prompts_by_rounds(runs):
    outputs = runs["sampled"]
    report = report_of(outputs)
    folder = samples_dir("samples_a")
    assert sorted(p.name for p in folder.iterdir()) == ["step_000002.png", "step_000003.png"]
    assert report["sample_images"] == {"folder": str(folder), "steps": [2, 3]}
    assert str(folder) in outputs[2].splitlines()
    timing = report["timing"]
    assert set(timing) == {"training_seconds", "sampling_seconds", "sample_rounds", "validation_seconds"}
    assert timing["sample_rounds"] == 2 and timing["sampling_seconds"] > 0 and timing["validation_seconds"] == 0
    assert 0 < timing["training_seconds"] < report["seconds"]

    grid = outputs[6]
    rows, columns = len(PROMPTS), 2
    assert grid.shape[0] == 1 and grid.shape[-1] == 3
    assert grid.shape[2] == LABELS + columns * SAMPLE_SIZE
    header = grid.shape[1] - rows * SAMPLE_SIZE
    assert 0 < header < SAMPLE_SIZE  # one line of step labels above the rows
    for column, name in enumerate(["step_000002.png", "step_000003.png"]):
        picture = torch.from_numpy(np.asarray(Image.open(folder / name).convert("RGB"), dtype=np.float32) / 255)
        assert picture.shape[1] == rows * SAMPLE_SIZE  # the prompts side by side
        for row in range(rows):
            saved = picture[-SAMPLE_SIZE:, row * SAMPLE_SIZE:(row + 1) * SAMPLE_SIZE]
            top, left = header + row * SAMPLE_SIZE, LABELS + column * SAMPLE_SIZE
            cell = grid[0, top:top + SAMPLE_SIZE, left:left + SAMPLE_SIZE]
            assert torch.equal(cell, saved), (row, column)
    # the rounds differ (training moved the identity) and so do the prompts
    cells = grid[0, header:, LABELS:]
    assert not torch.equal(cells[:, :SAMPLE_SIZE], cells[:, SAMPLE_SIZE:])
    assert not torch.equal(cells[:SAMPLE_SIZE], cells[SAMPLE_SIZE:])


def test_the_same_run_gives_the_same_sample_images(runs):
    first, second = samples_dir("samples_a"), samples_dir("samples_b")
    for name in ("step_000002.png", "step_000003.png"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert torch.equal(runs["sampled"][6], runs["again"][6])


def _trained_state(save_name: str) -> dict[str, torch.Tensor]:
    tokens = load_id_tokens(tokens_dir() / f"{save_name}.safetensors")
    import folder_paths

    lora = safetensors.torch.load_file(str(Path(folder_paths.get_folder_paths("loras")[0]) / f"{save_name}.safetensors"))
    state = safetensors.torch.load_file(str(tokens_dir() / f"{save_name}.trainstate"))
    return {**{f"keys.{n}": v for n, v in tokens.keys.items()}, **{f"values.{n}": v for n, v in tokens.values.items()},
            **{f"generator.{n}": v for n, v in tokens.generator.items()}, **{f"lora.{n}": v for n, v in lora.items()},
            **{f"state.{n}": v for n, v in state.items()}}


def test_sampling_changes_nothing_that_is_trained(runs):
    sampled, plain = _trained_state("samples_a"), _trained_state("samples_none")
    assert sampled.keys() == plain.keys()
    for name, value in sampled.items():
        # bit for bit: tokens, generator, LoRA, optimiser state, loss history (NaN where a step measured nothing)
        torch.testing.assert_close(value, plain[name], rtol=0, atol=0, equal_nan=True, msg=name)
    assert report_of(runs["sampled"])["final_losses"] == report_of(runs["plain"])["final_losses"]


def test_without_prompts_or_with_sample_every_0_nothing_is_sampled(runs, parts):
    plain = runs["plain"]
    assert not samples_dir("samples_none").exists()
    report = report_of(plain)
    assert report["sample_images"] is None
    assert report["timing"]["sample_rounds"] == 0 and report["timing"]["sampling_seconds"] == 0
    assert plain[6].shape == (1, 64, 320, 3)  # a small note instead of the grid
    assert float(plain[6].min()) < 0.5 < float(plain[6].max())  # it says something

    never = train(parts, "samples_never", steps=1, lora_rank=0, sample_prompts="a photo of sks", sample_every=0)
    assert not samples_dir("samples_never").exists()
    assert report_of(never)["timing"]["sample_rounds"] == 0


def test_samples_are_encoded_as_encode_with_id_encodes_the_trained_identity(runs, parts):
    """The text-splicing hook of the training run leaves the sample prompts' encoding alone: the last round's
    conditioning is what IDFuse Encode With ID makes of the output tokens outside the run."""
    spy = runs["spy"]
    assert [text for text, _ in spy.conditionings] == list(RENDERED) * 2  # two rounds, each prompt once
    tokens = runs["sampled"][0]
    for text, inside in spy.conditionings[-2:]:
        (outside,) = IDFuseEncodeWithID().encode(parts["clip"], tokens, text)
        assert torch.equal(inside[0][0], outside[0][0])
        contexts_in, contexts_out = inside[0][1]["idfuse_stage_contexts"], outside[0][1]["idfuse_stage_contexts"]
        assert torch.equal(contexts_in.keys, contexts_out.keys) and torch.equal(contexts_in.values, contexts_out.values)


def test_the_lora_being_trained_acts_in_the_samples(runs, parts):
    spy = runs["spy"]
    targets = {name for name, m in parts["model"].model.diffusion_model.named_modules()
               if name.endswith(("attn2.to_k", "attn2.to_v"))}
    assert spy.hooked_layers and all(targets <= hooked for hooked in spy.hooked_layers)
    # outside the run: the output tokens through the output model (the LoRA as weight patches) give the last
    # round again; through the input model (no LoRA) they do not
    tokens, model_out = runs["sampled"][0], runs["sampled"][1]
    last = torch.from_numpy(np.asarray(Image.open(samples_dir("samples_a") / "step_000003.png").convert("RGB"),
                                       dtype=np.float32) / 255)[-SAMPLE_SIZE:, :SAMPLE_SIZE]
    run_settings = TrainingSettings(sample_prompts=PROMPTS[:1], sample_steps=2, sample_size=SAMPLE_SIZE)

    def rendered(model) -> torch.Tensor:
        rounds = SampleRounds(model, parts["clip"], parts["vae"], run_settings, Path("unused"))
        with torch.no_grad():
            image = rounds._render(tokens, RENDERED[0])[0]
        return (image * 255).round() / 255  # as the PNG stores it

    with_lora, without = rendered(model_out), rendered(parts["model"])
    assert (with_lora - last).abs().max() <= 2 / 255  # the LoRA merged into the weights rounds differently
    assert (without - last).abs().max() > 10 / 255


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_round_renders_each_prompt_and_leaves_the_global_random_state_alone(family, parts, tokenizer_dir,
                                                                               tmp_path):
    model, clip = ((parts["model"], parts["clip"]) if family == "sd15"
                   else (make_model("sdxl"), make_clip("sdxl", tokenizer_dir)))
    rounds = SampleRounds(model, clip, parts["vae"],
                          TrainingSettings(sample_prompts=("sks smiling", "{} in Paris"), sample_steps=1,
                                           sample_size=SAMPLE_SIZE, seed=5), tmp_path)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    rounds.render(make_id_tokens(family, num_stages=2), 7)
    assert torch.equal(torch.rand(4), expected)
    assert (tmp_path / "step_000007.png").is_file()
    ((step, images),) = rounds.rounds
    assert step == 7 and images.shape == (2, SAMPLE_SIZE, SAMPLE_SIZE, 3) and images.dtype == torch.uint8


def test_sample_prompts_need_the_placeholder_or_braces():
    assert parse_sample_prompts("a photo of sks\n\n  {} in Paris  \n") == ("a photo of sks", "{} in Paris")
    assert parse_sample_prompts("a photo of SKS\n{} in Paris", "sks") == ("a photo of SKS", "sks in Paris")
    assert parse_sample_prompts("", "sks") == ()
    for text, line in [("a photo of sks\na photo of a person", 2), ("a photo of sksperson", 1),
                       ("\n\na {}person", 3)]:
        with pytest.raises(IDFuseInputError, match=f"sample_prompts line {line} .* names neither the placeholder "
                                                   "'sks' nor {}"):
            parse_sample_prompts(text, "sks")


def test_a_prompt_without_the_placeholder_fails_before_any_work(parts):
    with pytest.raises(IDFuseInputError, match="sample_prompts line 2 'a photo of zwx'"):
        train(parts, "samples_bad_prompt", steps=1, lora_rank=0, sample_prompts="sks smiling\na photo of zwx")
    assert not any(tokens_dir().glob("samples_bad_prompt*"))


def test_the_save_name_check_counts_the_samples_folder(monkeypatch):
    checked = []
    monkeypatch.setattr(training_files, "check_save_name", lambda name, names: checked.extend(names))
    files = OutputFiles("someone")
    assert files.samples == tokens_dir() / "someone.samples"
    assert "someone.samples" in checked


def test_an_interrupt_while_sampling_keeps_the_last_step(parts):
    common = {**SAMPLED, "steps": 4, "checkpoint_every": 0}
    # the first round (after step 2) is the first UNet call without gradients once training started
    with interrupt_at("sample", model=parts["model"], vae=parts["vae"], call=5, total_steps=4) as interrupt:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(parts, "samples_cut", **common)
    assert interrupt.assert_fired().phase == "sample"
    report = json.loads((tokens_dir() / "samples_cut.report.json").read_text())
    assert report["stopped"] == {"phase": "sample images", "steps_done": 2}
    assert load_id_tokens(tokens_dir() / "samples_cut.safetensors").training["steps_done"] == 2
    assert not (samples_dir("samples_cut") / "step_000002.png").exists()  # the round was cut short


def test_a_resumed_run_adds_its_rounds_beside_the_earlier_ones(parts):
    common = {**SAMPLED, "sample_every": 1, "lora_rank": 0}
    train(parts, "samples_resumed", **{**common, "steps": 2})
    folder = samples_dir("samples_resumed")
    earlier = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(earlier) == ["step_000001.png", "step_000002.png"]
    resumed = train(parts, "samples_resumed", resume_from="samples_resumed.safetensors", **{**common, "steps": 3})
    assert sorted(p.name for p in folder.iterdir()) == ["step_000001.png", "step_000002.png", "step_000003.png"]
    assert all((folder / name).read_bytes() == data for name, data in earlier.items())
    assert report_of(resumed)["sample_images"]["steps"] == [3]  # the output grid: this run's rounds
    assert resumed[6].shape[2] == LABELS + SAMPLE_SIZE


def test_round_picture_is_a_png_of_the_prompts_side_by_side(tmp_path):
    from comfyui_idfuse.models.training.sample_grid import round_picture, samples_grid

    images = torch.rand(3, 32, 48, 3, generator=torch.Generator().manual_seed(0))
    picture = round_picture(images, ["one", "two", "a much longer prompt " * 5], 400)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    pixels = torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255)
    assert pixels.shape[1] == 3 * 48
    assert torch.equal(pixels[-32:, 48:96], (images[1] * 255).round() / 255)
    grid = samples_grid([(100, images), (200, images.flip(1))], ["one", "two", "three"])
    assert grid.shape[2] == row_label_width(48) + 2 * 48 and (grid.shape[1] - 3 * 32) > 0


def test_a_grid_of_many_rounds_is_shrunk_to_the_largest_side():
    from comfyui_idfuse.models.training.sample_grid import samples_grid

    rounds = [(step, torch.full((1, 256, 256, 3), step % 256, dtype=torch.uint8)) for step in range(40)]
    grid = samples_grid(rounds, ["sks"])
    assert grid.shape[2] <= MAX_GRID_SIDE
    cell = (grid.shape[2] - row_label_width(256)) / 40
    assert cell == int(cell) and 16 <= cell < 256  # every cell shrunk alike


def test_after_each_round_the_run_trains_on_its_own_clone_loaded_again(parts, monkeypatch):
    """ComfyUI's sampler loads the sample clone (and unloads the run's clone of the same model): before every
    step, model management holds the run's clone of the UNet again, as after the run's first load."""
    import comfy.model_management

    from comfyui_idfuse.models.training.token_trainer import IdentityTrainer

    base = parts["model"].model
    loaded_at_step = []
    train_step = IdentityTrainer.train_step

    def recording_step(trainer):
        loaded_at_step.append([lm.model for lm in comfy.model_management.current_loaded_models
                               if lm.model is not None and lm.model.model is base])
        return train_step(trainer)

    monkeypatch.setattr(IdentityTrainer, "train_step", recording_step)
    train(parts, "samples_reloaded", **{**SAMPLED, "steps": 3, "sample_every": 1, "lora_rank": 0})
    assert len(loaded_at_step) == 3 and len(loaded_at_step[0]) == 1
    assert all(len(entries) == 1 and entries[0] is loaded_at_step[0][0] for entries in loaded_at_step)
