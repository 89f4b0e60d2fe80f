"""scripts/train_id_encoder.py in this process: its flags, its errors (each naming the flag), resume checks, NaN and
Ctrl-C handling, prompts and VAE encoding. The multi-process runs are in test_accelerate_runs.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from script_launcher import imported_script
from tiny_checkpoint import register_tiny_models, unregister_tiny_models, write_tiny_checkpoint, write_tiny_dataset

from comfyui_idfuse.models.errors import IDFuseInputError
from comfyui_idfuse.models.training import encoder_trainer
from comfyui_idfuse.models.training.encoder_settings import ENCODER_DEFAULTS, EncoderTrainingSettings

PACK = Path(__file__).resolve().parents[2]
SMALL_ENCODER = ["--clip-mapper-dim", "64", "--clip-mapper-depth", "1", "--face-hidden-dim", "64", "--ff-mult", "1",
                 "--num-clip-tokens", "2", "--num-face-tokens", "2"]


@pytest.fixture(scope="module")
def script():
    with imported_script("train_id_encoder", "train_id_encoder_under_test") as module:
        yield module


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder-script")
    register_tiny_models()
    yield write_tiny_checkpoint(root / "tiny_sd15.safetensors"), write_tiny_dataset(root / "faces", [[3, 2], [2, 3]])
    unregister_tiny_models()


def argv(checkpoint, data, output, *extra) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--data", str(data), "--output", str(output), "--cpu", "--steps", "4",
            "--save-every", "2", "--batch-size", "2", "--validation-identities", "1", *SMALL_ENCODER, *extra]


def errors(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def training_metadata(path: Path) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["training"])


# --------------------------------------------------------------------------------------------- flags


def test_every_setting_is_a_flag_with_its_default_and_the_issue_names_work(script):
    parser = script.build_parser()
    defaults = vars(parser.parse_args(["--checkpoint", "c", "--data", "d", "--output", "o"]))
    for spec in dataclasses.fields(EncoderTrainingSettings):
        if spec.name != "resolution":  # the dataset's
            assert defaults[spec.name] == getattr(ENCODER_DEFAULTS, spec.name), spec.name
    given = vars(parser.parse_args(["--checkpoint", "c", "--data", "d", "--output", "o", "--save-every", "7",
                                    "--validate-every", "9", "--gradient-accumulation-steps", "3",
                                    "--no-train-clip-mapper", "--text-attention", "on"]))
    assert (given["checkpoint_every"], given["validation_every"], given["gradient_accumulation"]) == (7, 9, 3)
    assert given["train_clip_mapper"] is False and given["text_attention"] == "on"
    settings = script.settings_from_args(parser.parse_args(["--checkpoint", "c", "--data", "d", "--output", "o"]), 64)
    assert settings == dataclasses.replace(ENCODER_DEFAULTS, resolution=64)
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint", "c", "--data", "d", "--output", "o", "--mixed-precision", "fp8"])


# --------------------------------------------------------------------------------------------- resume checks


def progress(**changes) -> dict:
    base = {"settings": ENCODER_DEFAULTS.to_dict(), "global_batch": 8, "data_index_hash": "abc",
            "encoder": {"family": "sd15"}, "prompts": ["a photo of a person"], "checkpoint": "sd15.safetensors"}
    settings = {k: v for k, v in changes.items() if k in base["settings"]}
    return {**base, **{k: v for k, v in changes.items() if k not in settings},
            "settings": {**base["settings"], **settings}}


def test_a_resume_with_other_step_settings_is_refused_naming_them(script):
    with pytest.raises(IDFuseInputError, match=r"learning_rate: this run 0\.0002, the checkpoint 0\.0001") as e:
        script.check_resume(progress(), progress(learning_rate=2e-4), Path("ckpt"))
    assert "--resume ckpt" in str(e.value)
    with pytest.raises(IDFuseInputError, match="global_batch: this run 16, the checkpoint 8"):
        script.check_resume(progress(), progress(global_batch=16), Path("ckpt"))
    with pytest.raises(IDFuseInputError, match="data_index_hash"):
        script.check_resume(progress(), progress(data_index_hash="other"), Path("ckpt"))
    with pytest.raises(IDFuseInputError, match="steps: this run 50, the checkpoint 20000"):
        script.check_resume(progress(lr_schedule="cosine"), progress(lr_schedule="cosine", steps=50), Path("ckpt"))


def test_a_resume_may_change_the_split_of_the_global_batch_and_the_length_of_a_constant_run(script):
    script.check_resume(progress(batch_size=8), progress(batch_size=2, gradient_accumulation=2, steps=50,
                                                         checkpoint_every=5), Path("ckpt"))


# --------------------------------------------------------------------------------------------- errors


def test_a_data_folder_without_shards_is_refused(script, inputs, tmp_path, caplog):
    checkpoint, _ = inputs
    (tmp_path / "empty").mkdir()
    assert script.main(argv(checkpoint, tmp_path / "empty", tmp_path / "out")) == 2
    assert f"--data {tmp_path / 'empty'} holds no finished shard" in errors(caplog)


def test_an_embedding_space_the_encoder_cannot_read_is_refused(script, inputs, tmp_path, caplog):
    checkpoint, _ = inputs
    data = write_tiny_dataset(tmp_path / "faces", [[2, 2, 2]], embedding_space="mystery-recogniser-64", width=64)
    assert script.main(argv(checkpoint, data, tmp_path / "out")) == 2
    assert "--data" in errors(caplog) and "'mystery-recogniser-64'" in errors(caplog)


def test_an_init_file_of_another_family_is_refused(script, inputs, tmp_path, caplog):
    from ip_adapter_files import write_faceid

    checkpoint, data = inputs
    init = write_faceid(tmp_path / "ip-adapter-faceid-plus_sdxl.safetensors", "faceid_plus", "sdxl")
    assert script.main(argv(checkpoint, data, tmp_path / "out", "--init", str(init))) == 2
    assert f"--init {init} is for sdxl" in errors(caplog)


def test_a_checkpoint_comfyui_does_not_recognise_is_refused(script, inputs, tmp_path, caplog):
    from safetensors.torch import save_file

    _, data = inputs
    bogus = tmp_path / "not_a_model.safetensors"
    save_file({"something.weight": torch.zeros(3, 3)}, str(bogus))
    assert script.main(argv(bogus, data, tmp_path / "out")) == 2
    assert f"--checkpoint {bogus}" in errors(caplog)


def test_text_attention_on_needs_the_checkpoints_text_encoder(script, inputs, tmp_path, caplog):
    checkpoint, data = inputs
    assert script.main(argv(checkpoint, data, tmp_path / "out", "--text-attention", "on")) == 2
    assert "--text-attention on needs the checkpoint's text encoder" in errors(caplog)


# --------------------------------------------------------------------------------------------- stopping


def forward_failing_at(step_to_fail: int, failure):
    original = encoder_trainer.EncoderTraining.forward

    def forward(self, batch, step):
        loss = original(self, batch, step)
        if step >= step_to_fail:
            return failure(loss)
        return loss

    return forward


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(script, inputs, tmp_path, caplog,
                                                                                monkeypatch):
    checkpoint, data = inputs
    monkeypatch.setattr(encoder_trainer.EncoderTraining, "forward", forward_failing_at(3, lambda loss: loss * torch.nan))
    output = tmp_path / "out"
    assert script.main(argv(checkpoint, data, output)) == 2
    assert "Training step 3: the loss is not finite" in errors(caplog)
    assert [p.name for p in script.complete_checkpoints(output)] == ["step_000002"]
    assert training_metadata(output / "idfuse_encoder.safetensors")["steps"] == 2


def test_ctrl_c_saves_the_state_and_the_encoder_at_the_last_finished_step(script, inputs, tmp_path, caplog, monkeypatch):
    checkpoint, data = inputs

    def interrupt(loss):
        raise KeyboardInterrupt

    monkeypatch.setattr(encoder_trainer.EncoderTraining, "forward", forward_failing_at(3, interrupt))
    output = tmp_path / "out"
    assert script.main(argv(checkpoint, data, output)) == script.INTERRUPTED_EXIT_CODE
    assert [p.name for p in script.complete_checkpoints(output)] == ["step_000002", "step_000003"]
    assert training_metadata(output / "idfuse_encoder.safetensors")["steps"] == 3
    assert (output / "idfuse_encoder_step_000003.safetensors").is_file()
    monkeypatch.undo()
    # The interrupted run resumes from there, and only with the same step settings.
    caplog.clear()
    assert script.main(argv(checkpoint, data, output, "--resume", "latest", "--learning-rate", "0.0003")) == 2
    assert "learning_rate: this run 0.0003, the checkpoint 0.0001" in errors(caplog)
    assert script.main(argv(checkpoint, data, output, "--resume", "latest")) == 0
    assert training_metadata(output / "idfuse_encoder.safetensors")["steps"] == 4


# --------------------------------------------------------------------------------------------- batches


def test_prompts_are_encoded_once_and_each_sample_gets_its_own(script, tokenizer_dir):
    from factories import make_clip

    clip = make_clip("sd15", tokenizer_dir)
    contexts, pooled = script.encode_prompts(clip, ["a photo of a person", "a painting of a person"])
    assert contexts.shape == (2, 77, 768) and not torch.equal(contexts[0], contexts[1])
    run = types.SimpleNamespace(prompt_contexts=(contexts, pooled), accelerator=types.SimpleNamespace(device="cpu"),
                                denoiser=types.SimpleNamespace(process_latent_in=lambda x: x * 2), data="d",
                                args=types.SimpleNamespace(checkpoint="c"), has_vae=lambda: False)
    samples = types.SimpleNamespace(target_latents=torch.ones(3, 4, 2, 2), target_images=None,
                                    prompts=torch.tensor([1, 0, 1]), sample_ids=torch.arange(3),
                                    reference_faces=torch.zeros(3, 128), reference_clip=None)
    batch = script.EncoderRun.pair_batch(run, samples)
    assert torch.equal(batch.prompts_context, contexts[[1, 0, 1]])
    assert torch.equal(batch.target_latents, torch.full((3, 4, 2, 2), 2.0))  # scaled for the model


def test_crops_without_latents_are_encoded_with_the_checkpoints_vae(script):
    from factories import tiny_vae

    from comfyui_idfuse.nodes.glue.encoder_training import encode_crops

    vae = tiny_vae()
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    run = types.SimpleNamespace(prompt_contexts=None, accelerator=types.SimpleNamespace(device="cpu"), vae=vae,
                                denoiser=types.SimpleNamespace(process_latent_in=lambda x: x * 0.5), data="d",
                                args=types.SimpleNamespace(checkpoint="c"), has_vae=lambda: True)
    samples = types.SimpleNamespace(target_latents=None, target_images=images, prompts=torch.zeros(2, dtype=torch.long),
                                    sample_ids=torch.arange(2), reference_faces=torch.zeros(2, 128),
                                    reference_clip=None)
    torch.manual_seed(0)  # ComfyUI's VAE samples its latent distribution
    batch = script.EncoderRun.pair_batch(run, samples)
    torch.manual_seed(0)
    expected = encode_crops(vae, images) * 0.5
    assert batch.target_latents.shape == (2, 4, 2, 2)
    assert torch.allclose(batch.target_latents, expected)
    run.has_vae = lambda: False
    with pytest.raises(IDFuseInputError, match="neither latents nor training crops with a VAE"):
        script.EncoderRun.pair_batch(run, types.SimpleNamespace(**{**vars(samples), "target_images": None}))
