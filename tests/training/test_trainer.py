"""IDFuse Train Identity on small SD1.5 / SDXL models: gradients, learning, the attention loss,
interrupt + resume, NaN, masks, the saved LoRA in ComfyUI's own loader, the input model untouched."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from factories import make_clip, make_model, tiny_vae
from interrupts import Interruption, interrupt_at
from trainer_inputs import SIZE, face_photos, settings, widget_defaults

import comfyui_idfuse
from comfyui_idfuse.models.errors import IDFuseInputError, TrainingError
from comfyui_idfuse.models.faces.masks import ellipse_mask
from comfyui_idfuse.models.tokens.format import load_id_tokens
from comfyui_idfuse.models.training import probes as attention_loss
from comfyui_idfuse.models.training.frozen import without_inference_tensors
from comfyui_idfuse.models.training.photos import prepare_photos
from comfyui_idfuse.models.training.settings import DEFAULT_SAVE_NAME, TrainingSettings, setting_range
from comfyui_idfuse.models.training.token_trainer import IdentityTrainer
from comfyui_idfuse.models.unet import select_layers
from comfyui_idfuse.nodes.glue.lora_files import LORA_TARGET_CHOICES
from comfyui_idfuse.nodes.glue.training_files import MAX_FILE_NAME_BYTES, OutputFiles
from comfyui_idfuse.nodes.glue.training_masks import face_masks
from comfyui_idfuse.nodes.glue.training_options import LOSS_LAYER_CHOICES
from comfyui_idfuse.nodes.train import NODE_CLASS_MAPPINGS, IDFuseTrainIdentity, IDFuseTrainingOptions

LEARNING_STEPS = 36  # "a few dozen": enough for the loss and the face share to move clearly


@pytest.fixture(scope="module", autouse=True)
def output_folders(tmp_path_factory):
    """Token and LoRA folders in a temporary models folder (never a real ComfyUI's)."""
    import folder_paths

    from comfyui_idfuse.nodes.glue.folders import ID_TOKENS_FOLDER

    root = tmp_path_factory.mktemp("models")
    saved_dir, saved = folder_paths.models_dir, dict(folder_paths.folder_names_and_paths)
    folder_paths.models_dir = str(root)
    folder_paths.folder_names_and_paths[ID_TOKENS_FOLDER] = ([str(root / "idfuse" / "tokens")], {".safetensors"})
    folder_paths.folder_names_and_paths["loras"] = ([str(root / "loras")], {".safetensors"})
    yield root
    folder_paths.models_dir = saved_dir
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)


@pytest.fixture(scope="module")
def parts(tokenizer_dir):
    images, masks = face_photos()
    return {"model": make_model("sd15"), "clip": make_clip("sd15", tokenizer_dir), "vae": tiny_vae(),
            "images": images, "masks": masks}


def train(parts, save_name: str, masks="default", **changes):
    kwargs = settings(save_name=save_name, **changes)
    masks = parts["masks"] if isinstance(masks, str) else masks
    with torch.inference_mode():  # as ComfyUI runs nodes
        return IDFuseTrainIdentity().train(parts["model"], parts["clip"], parts["vae"], parts["images"],
                                           masks=masks, **kwargs)


def train_interrupted(parts, save_name: str, phase: str, step: int | None = None, call: int = 1,
                      layer: str | None = None, **changes) -> Interruption:
    """Train until ComfyUI's interrupt arrives at ``phase`` (tests/support/interrupts.py); where it fired."""
    import comfy.model_management

    with interrupt_at(phase, model=parts["model"], vae=parts["vae"], step=step, call=call, layer=layer,
                      total_steps=changes.get("steps")) as interrupt:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(parts, save_name, **changes)
    return interrupt.assert_fired()


def _leftover_hooks(root: torch.nn.Module) -> list[str]:
    """Modules still carrying a hook or a replaced forward after training."""
    return [name for name, m in root.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__]


def _model_fingerprint(model) -> dict:
    return {k: v.clone() for k, v in model.model.state_dict().items()}


@pytest.fixture(scope="module")
def mask_and_off_runs(parts):
    """Same seed and steps, attention loss on (face_mask) and off; the input model checked around them."""
    model = parts["model"]
    weights = _model_fingerprint(model)
    options, patches = copy.deepcopy(model.model_options), {k: list(v) for k, v in model.patches.items()}
    flags = [p.requires_grad for p in model.model.parameters()]
    face = train(parts, "face_run", steps=LEARNING_STEPS, attention_mode="face_mask")
    off = train(parts, "off_run", steps=LEARNING_STEPS, attention_mode="off")
    untouched = (all(torch.equal(v, weights[k]) for k, v in model.model.state_dict().items())
                 and model.model_options == options and {k: list(v) for k, v in model.patches.items()} == patches
                 and [p.requires_grad for p in model.model.parameters()] == flags
                 and not _leftover_hooks(model.model) and not _leftover_hooks(parts["clip"].cond_stage_model))
    return {"face": face, "off": off, "input_untouched": untouched}


def _report(outputs) -> dict:
    return json.loads(outputs[5])


def test_node_is_registered_with_its_defaults():
    assert NODE_CLASS_MAPPINGS["IDFuseTrainIdentity"] is IDFuseTrainIdentity
    assert NODE_CLASS_MAPPINGS["IDFuseTrainingOptions"] is IDFuseTrainingOptions
    assert IDFuseTrainIdentity.CATEGORY == IDFuseTrainingOptions.CATEGORY == "IDFuse/training"
    required = IDFuseTrainIdentity.INPUT_TYPES()["required"]
    assert list(required) == ["model", "clip", "vae", "placeholder", "initializer", "steps",
                              "learning_rate", "attention_weight", "lora_rank", "seed", "save_name", "resume_from"]
    # images became optional in 0.5.0 (or training_photos); as the first optional input its socket keeps its
    # place after vae, so saved workflows' links still land on it.
    optional = IDFuseTrainIdentity.INPUT_TYPES()["optional"]
    assert list(optional)[:4] == ["images", "masks", "face_analysis", "options"]
    defaults = {**widget_defaults(IDFuseTrainIdentity), **widget_defaults(IDFuseTrainingOptions)}
    assert defaults["placeholder"] == "sks" and defaults["initializer"] == "person"
    assert defaults["num_stages"] == 5 and defaults["learning_rate"] == 1e-4 and defaults["attention_weight"] == 0.003
    assert defaults["attention_mode"] == "face_mask" and defaults["loss_layers"] == "2, 4"
    assert defaults["lora_rank"] == 0 and defaults["lora_targets"] == "to_k, to_v"
    assert list(optional)[4:] == ["validation_images", "training_photos"]
    assert IDFuseTrainIdentity.INPUT_TYPES()["optional"]["options"][0] == IDFuseTrainingOptions.RETURN_TYPES[0]


# --- one home for the defaults: TrainingSettings, read by both nodes and stated by the docs ---------

PACK = Path(comfyui_idfuse.__file__).parent
# node input -> TrainingSettings field, where the widget shows the setting in another form
WIDGET_FORMS = {"loss_layers": ("loss_downscales", LOSS_LAYER_CHOICES.get),
                "lora_targets": ("lora_targets", LORA_TARGET_CHOICES.get),
                "templates": ("templates", lambda text: tuple(text.splitlines())),
                "sample_prompts": ("sample_prompts", lambda text: tuple(text.splitlines()))}


def _setting_of(input_name: str, widget_value):
    field_name, parse = WIDGET_FORMS.get(input_name, (input_name, lambda v: v))
    return field_name, parse(widget_value)


def test_node_defaults_and_ranges_are_the_settings():
    plain = TrainingSettings()
    settings_inputs = {f.name for f in fields(TrainingSettings)}
    seen = set()
    for node in (IDFuseTrainIdentity, IDFuseTrainingOptions):
        for name, (kind, spec) in node.INPUT_TYPES()["required"].items():
            if "default" not in spec or name in ("save_name", "resume_from"):
                continue
            field_name, value = _setting_of(name, spec["default"])
            assert value == getattr(plain, field_name), name
            limits = setting_range(field_name)
            assert {k: spec[k] for k in limits} == limits, name
            if isinstance(kind, list):
                assert spec["default"] in kind
            seen.add(field_name)
    assert seen == settings_inputs  # every setting has exactly one widget, on one of the two nodes
    assert widget_defaults(IDFuseTrainIdentity)["save_name"] == DEFAULT_SAVE_NAME


def _doc_value(cell: str):
    """A default as the docs write it: `text`, on/off, a number, or empty (a linked input)."""
    cell = cell.strip()
    if not cell:
        return None
    if cell in ("on", "off"):
        return cell == "on"
    if cell.startswith("`") and cell.endswith("`"):
        return cell[1:-1]
    return float(cell)


def _defaults_table(text: str) -> dict[str, object]:
    """``input -> default`` of the markdown table rows whose first cell is one `input` name."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) >= 3 and re.fullmatch(r"`\w+`( \(optional\))?", cells[0]):
            rows[cells[0].split("`")[1]] = cells[1]
    return rows


def _check_documented_defaults(rows: dict[str, str], where: str, text: str) -> None:
    defaults = {**widget_defaults(IDFuseTrainIdentity), **widget_defaults(IDFuseTrainingOptions)}
    for name, cell in rows.items():
        if name == "templates":  # the cell points to the list that follows the table
            block = re.search(r"```text\n(.*?)```", text, re.S)
            assert block and tuple(block.group(1).splitlines()) == TrainingSettings().templates, where
            continue
        if name not in defaults:
            assert _doc_value(cell) is None, f"{where}: {name} has no default"
            continue
        expected, documented = defaults[name], _doc_value(cell)
        if isinstance(expected, bool) or isinstance(expected, str):
            assert documented == expected, f"{where}: {name} is {cell}, the node's default {expected!r}"
        else:
            assert documented == pytest.approx(expected), f"{where}: {name} is {cell}, the node's default {expected}"


@pytest.mark.parametrize("node", [IDFuseTrainIdentity, IDFuseTrainingOptions])
def test_help_pages_list_every_input_with_the_settings_default(node):
    text = (PACK / "web" / "docs" / f"{node.__name__}.md").read_text(encoding="utf-8")
    rows = _defaults_table(text)
    inputs = node.INPUT_TYPES()
    assert set(rows) == set(inputs["required"]) | set(inputs.get("optional", {}))
    _check_documented_defaults(rows, f"{node.__name__}.md", text)


def test_readme_training_table_states_the_settings_defaults():
    readme = (PACK / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Training an identity", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows = _defaults_table(section)
    first_time = set(widget_defaults(IDFuseTrainIdentity)) - {"resume_from"}
    assert first_time <= set(rows), first_time - set(rows)
    assert len(rows) > len(first_time)  # and the options that matter most
    _check_documented_defaults(rows, "README.md", section)


def test_train_identity_without_options_is_the_default_options_node(monkeypatch):
    from comfyui_idfuse.nodes import train as train_module

    seen = []

    class Capture:
        def __init__(self, model, clip, vae, settings, save_name, resume_from):
            seen.append(settings)

        def run(self, images, masks, face_analysis, validation_images=None, training_photos=None):
            return ()

    monkeypatch.setattr(train_module, "TrainingRun", Capture)
    identity = widget_defaults(IDFuseTrainIdentity)
    default_options = IDFuseTrainingOptions().options(**widget_defaults(IDFuseTrainingOptions))[0]
    IDFuseTrainIdentity().train(None, None, None, None, **identity)
    IDFuseTrainIdentity().train(None, None, None, None, **identity, options=default_options)
    changed = IDFuseTrainingOptions().options(**{**widget_defaults(IDFuseTrainingOptions), "num_stages": 3})[0]
    IDFuseTrainIdentity().train(None, None, None, None, **identity, options=changed)
    assert seen[0] == seen[1] == TrainingSettings()
    assert seen[2] == dataclasses.replace(TrainingSettings(), num_stages=3)


# --- save names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "message"), [
    ("   ", "save_name is empty"), ("", "save_name is empty"),
    (" me", "starts or ends with a space"), ("me ", "starts or ends with a space"),
    ("a/b", "not a plain file name"), (".hidden", "not a plain file name"), ("tab\tname", "not a plain file name"),
])
def test_save_names_that_are_not_plain_file_names_are_refused(name, message):
    with pytest.raises(IDFuseInputError, match=message):
        OutputFiles(name)


def test_the_save_name_message_lists_what_the_rule_allows():
    with pytest.raises(IDFuseInputError) as refused:
        OutputFiles("a/b")
    message = str(refused.value)
    for allowed in ("my name", "Zoë_2.v-1", "张伟"):  # inner spaces, letters of any script, '_', '.', '-'
        OutputFiles(allowed)
    assert "spaces" in message and all(f"'{c}'" in message for c in "_-.")


def test_a_save_name_too_long_for_the_file_system_fails_before_training(parts, tmp_path):
    from comfyui_idfuse.models.files import atomic_write_text

    files = OutputFiles("a" * 200)
    longest_ok = MAX_FILE_NAME_BYTES - (len(f".{files.report.name}.xxxxxxxx.tmp") - 200)
    # The longest accepted name really writes every file (and its temporary file) on this file system.
    accepted = OutputFiles("a" * longest_ok)
    for path in (accepted.tokens, accepted.state, accepted.report, accepted.lora):
        atomic_write_text(tmp_path / path.name, "x")
    for too_long in ("a" * (longest_ok + 1), "a" * 240, "张" * 80):
        with pytest.raises(IDFuseInputError, match=rf"too long.*255 bytes.*at most {longest_ok} bytes"):
            OutputFiles(too_long)
    with pytest.raises(IDFuseInputError, match="too long"):  # through the node, before any file is made
        train(parts, "张" * 80)
    assert not list(Path(tiny_tokens_dir()).glob("张*"))
    help_page = (PACK / "web" / "docs" / "IDFuseTrainIdentity.md").read_text(encoding="utf-8")
    assert f"at most {longest_ok} bytes ({longest_ok} ASCII or {longest_ok // 3} CJK" in help_page


def test_gradients_reach_exactly_the_trainable_parameters(parts, monkeypatch):
    """After the 2nd step (the LoRA's up-projection is no longer zero), every generator and LoRA
    parameter has a non-zero gradient and no UNet, CLIP or VAE parameter has one; gradient
    checkpointing gives the same gradients."""
    frozen = {"unet": parts["model"].model, "clip": parts["clip"].cond_stage_model,
              "vae": parts["vae"].first_stage_model}
    seen: dict[bool, dict] = {}
    original = IdentityTrainer.train_step

    def spy(self):
        losses = original(self)
        if self.step == 2:
            trainable = {f"generator.{n}": p for n, p in self.generator.named_parameters()}
            trainable.update({f"lora.{n}": p for n, p in self.adapters.named_parameters()})
            seen[self.settings.gradient_checkpointing] = {
                "trainable": {n: None if p.grad is None else p.grad.clone() for n, p in trainable.items()},
                "frozen": [f"{name}.{n}" for name, m in frozen.items() for n, p in m.named_parameters()
                           if p.grad is not None],
            }
        return losses

    monkeypatch.setattr(IdentityTrainer, "train_step", spy)
    train(parts, "grads", attention_mode="both", lora_rank=2)
    train(parts, "grads_checkpointed", attention_mode="both", lora_rank=2, gradient_checkpointing=True)
    plain, checkpointed = seen[False], seen[True]
    assert plain["frozen"] == [] and checkpointed["frozen"] == []
    assert len(plain["trainable"]) > 10
    for name, grad in plain["trainable"].items():
        assert grad is not None and bool(grad.abs().sum() > 0), name
        torch.testing.assert_close(checkpointed["trainable"][name], grad, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for m in frozen.values() for p in m.parameters())


def test_loss_goes_down(mask_and_off_runs):
    for run in ("face", "off"):
        losses = _report(mask_and_off_runs[run])["evaluation_diffusion_loss"]
        print(f"{run}: evaluation diffusion loss {losses['before']:.4f} -> {losses['after']:.4f}")
        assert losses["after"] < 0.9 * losses["before"], (run, losses)


def test_face_mask_loss_moves_attention_onto_the_face(mask_and_off_runs):
    face = _report(mask_and_off_runs["face"])["face_attention_share"]
    off = _report(mask_and_off_runs["off"])["face_attention_share"]
    assert face["before"] == off["before"]  # same seed: the same start
    print(f"face share: face_mask {face['before']} -> {face['after']}, off {off['before']} -> {off['after']}")
    # late-2024 core and ComfyUI 0.3.64 alike: 0.19 -> 0.57 against 0.19 -> 0.18 (the mask covers 19 % of the photo)
    assert face["after"] > face["before"] + 0.15
    assert face["after"] - face["before"] > off["after"] - off["before"] + 0.15


def test_outputs_files_and_input_model(mask_and_off_runs, parts):
    tokens, model_out, files, loss_curve, maps, report_text, _samples = mask_and_off_runs["face"]
    assert mask_and_off_runs["input_untouched"]
    paths = [Path(p) for p in files.splitlines()]
    assert {p.suffix for p in paths} == {".safetensors", ".trainstate", ".json"} and all(p.is_file() for p in paths)
    report = json.loads(report_text)
    assert json.loads(Path(next(p for p in paths if p.suffix == ".json")).read_text()) == report
    assert report["steps_done"] == LEARNING_STEPS and report["settings"]["attention_mode"] == "face_mask"
    assert "float16_loss_scaling" not in report  # float32 here
    saved = load_id_tokens(next(p for p in paths if p.parent.name == "tokens" and p.suffix == ".safetensors"))
    assert saved.num_stages == 2 and saved.training["steps_done"] == LEARNING_STEPS and saved.generator
    for name in ("clip_l",):
        torch.testing.assert_close(saved.keys[name], tokens.keys[name])
        assert not torch.equal(saved.keys[name], saved.values[name])
    assert loss_curve.shape[0] == 1 and loss_curve.shape[-1] == 3
    assert maps.shape == (2, SIZE, 3 * SIZE, 3)
    assert model_out is not parts["model"]
    # rank 0: the input model itself
    assert train(parts, "tokens_only", steps=1, lora_rank=0, attention_mode="off")[1] is parts["model"]


def _patched_weights(patcher) -> dict[str, torch.Tensor]:
    """The weights as ComfyUI's model management loads them for sampling."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    try:
        return {k: v.clone() for k, v in patcher.model.state_dict().items()}
    finally:
        comfy.model_management.unload_all_models()


def test_saved_lora_loads_in_comfy_and_changes_exactly_the_trained_weights(mask_and_off_runs, parts):
    import comfy.lora
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    model = parts["model"]
    lora_path = next(Path(p) for p in mask_and_off_runs["face"][2].splitlines() if Path(p).parent.name == "loras")
    lora = comfy.utils.load_torch_file(str(lora_path))
    strength = 0.7
    loaded, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
    comfy.model_management.unload_all_models()
    original = {k: v.clone() for k, v in model.model.state_dict().items()}
    patched = _patched_weights(loaded)
    names = {k[: -len(".lora_down.weight")] for k in lora if k.endswith(".lora_down.weight")}
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    trained = {key_map[n]: n for n in names}
    assert len(trained) == 2 * len(select_layers("sd15"))  # to_k and to_v of every cross-attention layer
    assert all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in trained)
    for key, weight in original.items():
        if key in trained:
            name = trained[key]
            down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
            expected = weight + strength * (up @ down) * float(lora[f"{name}.alpha"]) / down.shape[0]
            torch.testing.assert_close(patched[key], expected, rtol=1e-5, atol=1e-6)
            assert not torch.equal(patched[key], weight)
        else:
            assert torch.equal(patched[key], weight), key
    # the node's MODEL output carries the same LoRA at strength 1
    node_model = _patched_weights(mask_and_off_runs["face"][1])
    at_one = _patched_weights(comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)[0])
    for key in trained:
        torch.testing.assert_close(node_model[key], at_one[key])


def test_reference_prompt_uses_the_same_query_for_both_maps(parts, monkeypatch):
    calls = []
    original = attention_loss.explicit_attention

    def spy(q, k, heads):
        calls.append((q, k))
        return original(q, k, heads)

    monkeypatch.setattr(attention_loss, "explicit_attention", spy)
    train(parts, "reference", steps=1, num_stages=1, attention_mode="reference_prompt", lora_rank=0)
    pairs = [(a, b) for a, b in zip(calls, calls[1:], strict=False) if a[0] is b[0]]
    assert len(pairs) == len(select_layers("sd15", (2, 4)))  # one training pass: target + reference per layer
    for (q_target, k_target), (q_reference, k_reference) in pairs:
        assert q_target is q_reference and k_target is not k_reference


MIDDLE_TO_K = "middle_block.1.transformer_blocks.0.attn2.to_k"  # a cross-attention K projection (LoRA target)


@pytest.mark.parametrize("where", [dict(phase="between_steps", step=3),
                                   dict(phase="step", step=4, layer=MIDDLE_TO_K, call=1)],
                         ids=["between_steps", "inside_a_layer_mid_step"])
def test_interrupt_leaves_loadable_files_and_resume_reaches_the_same_state(parts, where):
    """Both interrupts leave 3 steps: after step 3 is reported, and inside a layer's forward in step 4
    (where ComfyUI 0.8's per-layer check raises)."""
    import comfy.sd
    import comfy.utils

    common = {"steps": 5, "lora_rank": 2, "attention_mode": "face_mask", "checkpoint_every": 2}
    full_name, save_name = f"uninterrupted_{where['phase']}", f"interrupted_{where['phase']}"
    full_tokens = train(parts, full_name, **common)[0]
    full_lora = comfy.utils.load_torch_file(str(Path(tiny_lora_dir()) / f"{full_name}.safetensors"))

    train_interrupted(parts, save_name, **where, **common)

    stopped = load_id_tokens(Path(tiny_tokens_dir()) / f"{save_name}.safetensors")
    assert stopped.training["steps_done"] == 3
    assert _report_file(save_name)["stopped"] == {"phase": "training", "steps_done": 3}
    lora = comfy.utils.load_torch_file(str(Path(tiny_lora_dir()) / f"{save_name}.safetensors"))
    comfy.sd.load_lora_for_models(parts["model"], None, lora, 1.0, 0.0)  # loads

    resumed = train(parts, save_name, resume_from=f"{save_name}.safetensors", **common)
    assert _report(resumed)["steps_this_run"] == 2
    assert "stopped" not in _report(resumed)
    for name in full_tokens.keys:
        torch.testing.assert_close(resumed[0].keys[name], full_tokens.keys[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(resumed[0].values[name], full_tokens.values[name], rtol=0, atol=1e-6)
    resumed_lora = comfy.utils.load_torch_file(str(Path(tiny_lora_dir()) / f"{save_name}.safetensors"))
    for key, value in full_lora.items():
        torch.testing.assert_close(resumed_lora[key], value, rtol=0, atol=1e-6)


def _report_file(save_name: str) -> dict:
    return json.loads((Path(tiny_tokens_dir()) / f"{save_name}.report.json").read_text())


def _run_files(save_name: str) -> list[Path]:
    """Tokens, LoRA, training state and report of a save_name."""
    tokens, lora = Path(tiny_tokens_dir()), Path(tiny_lora_dir())
    return [tokens / f"{save_name}.safetensors", lora / f"{save_name}.safetensors",
            tokens / f"{save_name}.trainstate", tokens / f"{save_name}.report.json"]


def _saved_steps(save_name: str) -> tuple[int | None, int | None, int | None]:
    """steps_done of the token file, the LoRA (its metadata) and the training state; None where absent."""
    from safetensors import safe_open

    tokens, lora, state, _report_path = _run_files(save_name)

    def metadata(path: Path, key: str) -> int | None:
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            return int(f.metadata()[key])

    return (int(load_id_tokens(tokens).training["steps_done"]) if tokens.is_file() else None,
            metadata(lora, "steps_done"), metadata(state, "step"))


@pytest.mark.parametrize("phase, step, call, steps_kept, stopped", [
    ("encode_photos", None, 5, None, None),
    ("evaluate_before", None, 10, None, None),
    ("step", 3, 40, 2, "training"),
    ("save", 2, 2, 2, "checkpoint save"),  # the LoRA write of the step-2 checkpoint
    ("save", 5, 2, 5, "final save"),  # the LoRA write of the final save
    ("evaluate_after", None, 10, 5, "evaluation after training"),
])
def test_interrupt_in_any_phase_keeps_the_last_good_state(parts, phase, step, call, steps_kept, stopped):
    """Whatever the run is doing, an interrupt leaves one set of files of the last completed step with a
    report naming the phase, or (no step completed) no file at all."""
    name = f"cut_{phase}_{step}"
    fired = train_interrupted(parts, name, phase, step=step, call=call, steps=5, lora_rank=2,
                              attention_mode="face_mask", checkpoint_every=2)
    assert fired.phase == phase
    if steps_kept is None:
        assert _saved_steps(name) == (None, None, None)
        assert not any(path.exists() for path in _run_files(name))
        train(parts, name, steps=1, lora_rank=0, attention_mode="off")  # the save_name is still free
    else:
        assert _saved_steps(name) == (steps_kept,) * 3
        report = _report_file(name)
        assert report["stopped"] == {"phase": stopped, "steps_done": steps_kept}
        assert report["steps_done"] == steps_kept
        assert report["face_attention_share"]["after"] is None
        assert report["evaluation_diffusion_loss"]["after"] is None
        assert report["face_attention_share"]["before"] is not None


def test_interrupting_a_resumed_run_before_its_first_step_leaves_its_files_as_they_were(parts):
    common = {"lora_rank": 2, "attention_mode": "face_mask"}
    train(parts, "resumed_cut", steps=2, **common)
    before = {path: path.read_bytes() for path in _run_files("resumed_cut")}
    assert len(before) == 4

    train_interrupted(parts, "resumed_cut", "evaluate_before", call=10, steps=4,
                      resume_from="resumed_cut.safetensors", **common)

    assert {path: path.read_bytes() for path in _run_files("resumed_cut")} == before


def tiny_tokens_dir() -> str:
    from comfyui_idfuse.nodes.glue.folders import ID_TOKENS_FOLDER, default_folder

    return default_folder(ID_TOKENS_FOLDER)


def tiny_lora_dir() -> str:
    import folder_paths

    return folder_paths.get_folder_paths("loras")[0]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_state(parts, monkeypatch):
    original = IdentityTrainer._micro_batch

    def poisoned(self, step, micro):
        diffusion, attention = original(self, step, micro)
        return (diffusion * float("nan"), attention) if step == 2 else (diffusion, attention)

    monkeypatch.setattr(IdentityTrainer, "_micro_batch", poisoned)
    with pytest.raises(TrainingError, match=r"Training step 3: the loss is not finite.*step 2\) is saved"):
        train(parts, "diverging", steps=4, lora_rank=0, attention_mode="off")
    assert load_id_tokens(Path(tiny_tokens_dir()) / "diverging.safetensors").training["steps_done"] == 2


def test_masks_of_another_size_are_resized_and_empty_masks_are_an_error():
    images = torch.rand(2, 192, 128, 3)
    masks = torch.zeros(1, 96, 64)
    masks[:, 24:72, 16:48] = 1.0  # the middle half of the photo, given at half the photo's resolution
    photos, resized = prepare_photos(images, masks, resolution=256)
    assert photos.shape == (2, 320, 192, 3) and resized.shape == (2, 320, 192)  # one mask for both photos
    rows, cols = torch.nonzero(resized[1] > 0.5, as_tuple=True)
    assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (80, 239, 48, 143)
    images = torch.rand(2, 96, 64, 3)
    empty = torch.zeros(2, 96, 64)
    empty[0, 10:20, 10:20] = 1.0
    with pytest.raises(TrainingError, match="mask 2 of 2 is empty"):
        prepare_photos(images, empty, resolution=128)
    with pytest.raises(TrainingError, match="3 mask"):
        prepare_photos(images, torch.ones(3, 96, 64), resolution=128)


def test_empty_mask_through_the_node_names_the_input(parts):
    with pytest.raises(TrainingError, match="masks: mask 1 of 2 is empty"):
        train(parts, "empty_masks", masks=torch.zeros(2, 40, 40))


def test_face_detection_fallback(parts):
    class FakeDetector:  # insightface's det_model.detect: boxes with scores, 5 keypoints each
        input_shape = None

        def __init__(self, boxes):
            self.boxes = boxes

        def detect(self, image, input_size=None, max_num=0):
            import numpy as np

            found = np.array(self.boxes, dtype=np.float32).reshape(-1, 5)
            return found, np.zeros((len(found), 5, 2), dtype=np.float32)

    class FakeAnalysis:
        def __init__(self, boxes):
            self.det_model, self.det_size = FakeDetector(boxes), (640, 640)

    photos = torch.rand(1, 256, 256, 3)
    masks = face_masks(photos, FakeAnalysis([[64, 48, 192, 208, 0.9]]), required=True)
    torch.testing.assert_close(masks, ellipse_mask(256, 256, (64, 48, 192, 208)).unsqueeze(0))
    assert masks[0, 128, 128] == 1 and masks[0, 5, 5] == 0
    with pytest.raises(TrainingError, match="No face found in photo"):
        face_masks(photos, FakeAnalysis([]), required=True)
    assert face_masks(photos, FakeAnalysis([]), required=False) is None


def test_clear_errors_before_training(parts, tokenizer_dir):
    with pytest.raises(ValueError, match="placeholder word 'zqxjkvw' is .* tokens"):
        train(parts, "bad_placeholder", placeholder="zqxjkvw")
    with pytest.raises(TrainingError, match="CLIP is SDXL's but the model is SD1.5"):
        with torch.inference_mode():
            IDFuseTrainIdentity().train(parts["model"], make_clip("sdxl", tokenizer_dir), parts["vae"],
                                        parts["images"], **settings(save_name="mixed"))
    with pytest.raises(TrainingError, match="exactly once"):
        train(parts, "bad_template", templates="a photo of a face")
    train(parts, "taken", steps=1, lora_rank=0, attention_mode="off")
    with pytest.raises(TrainingError, match="already exists"):
        train(parts, "taken", steps=1, lora_rank=0, attention_mode="off")


def test_sdxl_trains_both_encoders(tokenizer_dir):
    images, masks = face_photos(1)
    parts = {"model": make_model("sdxl"), "clip": make_clip("sdxl", tokenizer_dir), "vae": tiny_vae(),
             "images": images, "masks": masks}
    tokens = train(parts, "sdxl_identity", steps=1, lora_rank=2, attention_mode="both", loss_layers="4")[0]
    assert tokens.family == "sdxl" and set(tokens.keys) == {"clip_l", "clip_g"}
    assert tokens.keys["clip_g"].shape == (2, 1280)


def test_training_through_weights_made_in_inference_mode():
    with torch.inference_mode():
        layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        layer(x).sum().backward()
    weight = layer.weight
    with without_inference_tensors(layer):
        assert layer.weight.data_ptr() == weight.data_ptr()  # shares the memory: nothing copied
        assert not layer.weight.is_inference()
        layer(x).sum().backward()
        assert x.grad is not None
    assert layer.weight is weight


def test_models_loaded_in_inference_mode_can_be_trained_through(tokenizer_dir):
    """ComfyUI loads checkpoints inside torch.inference_mode: their weights are inference tensors."""
    with torch.inference_mode():
        images, masks = face_photos(1)
        loaded = {"model": make_model("sd15", seed=1), "clip": make_clip("sd15", tokenizer_dir, seed=1),
                  "vae": tiny_vae(), "images": images, "masks": masks}
    assert next(loaded["model"].model.parameters()).is_inference()
    tokens = train(loaded, "loaded_in_inference_mode", steps=2, lora_rank=2, attention_mode="both")[0]
    assert torch.isfinite(tokens.keys["clip_l"]).all()
    assert next(loaded["model"].model.parameters()).is_inference()  # the originals are back


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_diffusion_loss_is_in_the_models_own_parameterisation(prediction):
    """From ComfyUI's x0 prediction the loss recovers the raw-output MSE: eps for eps models, v
    (= α·ε − σ_vp·x0) for v-prediction models."""
    from comfyui_idfuse.models.training.loop import diffusion_loss

    sampling = make_model("sd15", prediction=prediction).get_model_object("model_sampling")
    gen = torch.Generator().manual_seed(0)
    x0, noise, raw = (torch.randn(3, 4, 8, 8, generator=gen) for _ in range(3))
    sigma = sampling.sigma(torch.tensor([10.0, 500.0, 990.0]))
    s = sigma.view(-1, 1, 1, 1)
    x_noisy = sampling.noise_scaling(s, noise, x0)
    x0_pred = sampling.calculate_denoised(sigma, raw, x_noisy)
    alpha, sigma_vp = 1 / (1 + s ** 2) ** 0.5, s / (1 + s ** 2) ** 0.5
    target = noise if prediction == "eps" else alpha * noise - sigma_vp * x0
    torch.testing.assert_close(diffusion_loss(sampling, sigma, x0_pred, x0), ((raw - target) ** 2).mean())


def test_min_snr_weighting_and_lr_schedules_use_diffusers():
    pytest.importorskip("diffusers")
    from comfyui_idfuse.models.training.loop import make_lr_scheduler, min_snr_weight

    sampling = make_model("sd15").get_model_object("model_sampling")
    timesteps = torch.tensor([0, 400, 999])
    snr = 1 / sampling.sigmas[timesteps] ** 2  # SNR of ComfyUI's x0 + σ·ε
    torch.testing.assert_close(min_snr_weight(sampling, timesteps, 5.0), snr.clamp(max=5.0).float())
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_lr_scheduler("cosine", optimizer, warmup_steps=2, total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0.0 and rates[2] == pytest.approx(1.0) and rates[-1] < 0.1
    assert make_lr_scheduler("constant", optimizer, 0, 10) is None


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: overflow without a non-finite loss."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _overflow_at(steps: set[int], monkeypatch) -> None:
    original = IdentityTrainer._micro_batch

    def overflowing(self, step, micro):
        diffusion, attention = original(self, step, micro)
        return (_InfiniteGradient.apply(diffusion) if step in steps else diffusion), attention

    monkeypatch.setattr(IdentityTrainer, "_micro_batch", overflowing)


def _loss_scaler_state(save_name: str) -> dict | None:
    from safetensors import safe_open

    with safe_open(str(Path(tiny_tokens_dir()) / f"{save_name}.trainstate"), framework="pt") as f:
        scaler = (f.metadata() or {}).get("loss_scaler")
    return None if scaler is None else json.loads(scaler)


def test_float16_training_scales_the_loss_and_skips_overflowing_steps(parts, monkeypatch):
    # λ = 1: the tests' λ = 300 makes gradients that overflow float16 at the initial scale of 2**16
    common = {"steps": 3, "lora_rank": 2, "attention_mode": "face_mask", "attention_weight": 1.0}
    clean = train(parts, "fp16_clean", training_dtype="float16", **common)
    assert _loss_scaler_state("fp16_clean") == {"scale": 2.0 ** 16, "growth_factor": 2.0, "backoff_factor": 0.5,
                                                "growth_interval": 2000, "_growth_tracker": 3, "skipped_steps": 0,
                                                "skipped_total": 0}
    tokens = clean[0]
    assert all(bool(torch.isfinite(v).all()) for v in [*tokens.keys.values(), *tokens.values.values()])
    assert all(v.dtype == torch.float32 for v in tokens.generator.values())

    _overflow_at({1}, monkeypatch)
    overflowed = train(parts, "fp16_overflow", training_dtype="float16", **common)
    state = _loss_scaler_state("fp16_overflow")
    assert state["scale"] == 2.0 ** 15 and state["skipped_steps"] == 0  # step 2 skipped, step 3 not
    assert _report(overflowed)["steps_done"] == 3
    assert _report(overflowed)["float16_loss_scaling"] == {"final_scale": 2.0 ** 15, "skipped_steps": 1}
    with pytest.raises(TrainingError, match=r"Training step 2: the gradient is not finite"):
        train(parts, "fp32_overflow", training_dtype="float32", **common)


def test_float16_stops_when_every_step_overflows(parts, monkeypatch):
    from comfyui_idfuse.models.training import loop as trainer_module

    monkeypatch.setattr(trainer_module, "MAX_SKIPPED_STEPS", 2)
    _overflow_at({0, 1, 2, 3}, monkeypatch)
    with pytest.raises(TrainingError, match=r"step 2: the gradient in 2 float16 steps in a row is not finite"):
        train(parts, "fp16_diverging", steps=4, lora_rank=0, attention_mode="off", training_dtype="float16")


def test_a_float16_model_trains_with_loss_scaling(tokenizer_dir):
    images, masks = face_photos(1)
    half = {"model": make_model("sd15", dtype=torch.float16), "clip": make_clip("sd15", tokenizer_dir),
            "vae": tiny_vae(), "images": images, "masks": masks}
    outputs = train(half, "fp16_weights", steps=2, lora_rank=2, attention_mode="face_mask")
    assert _loss_scaler_state("fp16_weights") is not None
    assert all(bool(torch.isfinite(v).all()) for v in outputs[0].keys.values())


def test_float16_resume_restores_the_loss_scale(parts):
    """λ = 300 overflows float16 in the first steps, so the scale drops; a resumed run must start from
    the saved scale (not 2**16 again, which would skip steps the uninterrupted run took)."""

    common = {"steps": 4, "lora_rank": 0, "attention_mode": "face_mask", "training_dtype": "float16",
              "checkpoint_every": 1}
    full = train(parts, "fp16_full", **common)[0]
    full_scaler = _loss_scaler_state("fp16_full")
    train_interrupted(parts, "fp16_cut", "between_steps", step=2, **common)
    assert _loss_scaler_state("fp16_cut")["scale"] < 2.0 ** 16  # the overflow this test is about happened
    resumed = train(parts, "fp16_cut", resume_from="fp16_cut.safetensors", **common)[0]
    assert _loss_scaler_state("fp16_cut") == full_scaler
    for name in full.keys:
        torch.testing.assert_close(resumed.keys[name], full.keys[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(resumed.values[name], full.values[name], rtol=0, atol=1e-6)


def test_report_gives_each_loss_terms_value_and_gradient_share(parts):
    """``both`` with a LoRA: the diffusion term and each attention term, on the tokens and on the LoRA."""
    report = _report(train(parts, "term_shares", steps=2, attention_mode="both", lora_rank=2))
    terms = report["loss_terms"]
    assert terms["weights"] == {"diffusion": 1.0, "face_mask": 300.0,
                                "reference_prompt": 300.0 * TrainingSettings().reference_loss_scale}
    assert terms["gradient_measured_steps"] == [1]
    assert set(terms["values"]) == {"diffusion", "face_mask", "reference_prompt", "over_steps"}
    assert terms["values"]["face_mask"] + terms["values"]["reference_prompt"] == pytest.approx(
        report["final_losses"]["attention"])
    for group in ("tokens", "lora"):
        shares = terms["gradient_share"]["first"][group]
        assert set(shares) == {"diffusion", "face_mask", "reference_prompt"}
        assert sum(shares.values()) == pytest.approx(1.0) and all(0 < v < 1 for v in shares.values()), group
        assert terms["gradient_norm"]["first"][group]["diffusion"] > 0


def test_resume_through_the_node_refuses_another_learning_rate_and_keeps_the_history(parts):
    common = {"lora_rank": 0, "attention_mode": "face_mask"}
    train(parts, "resume_checked", steps=1, **common)
    with pytest.raises(TrainingError, match=re.escape("trained with learning_rate = 0.01, this run has 0.02")):
        train(parts, "resume_checked", steps=2, learning_rate=0.02, resume_from="resume_checked.safetensors", **common)
    resumed = _report(train(parts, "resume_checked", steps=2, resume_from="resume_checked.safetensors", **common))
    assert resumed["steps_done"] == 2 and resumed["loss_terms"]["gradient_measured_steps"] == [1]
    assert resumed["loss_terms"]["values"]["over_steps"] == 2
