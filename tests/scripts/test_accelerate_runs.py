"""The training script run as users run it, in subprocesses: one process, and two processes through ``accelerate
launch`` on the CPU (gloo), against ComfyUI's own loader reading a tiny SD1.5 checkpoint file.

- 2 processes × batch 1 train on exactly the global batches of 1 process × batch 2 (encoder_data's plan), and
  both processes hold identical weights (each checkpoint records every process's weights fingerprint); every
  step's loss and gradient norm agree to float rounding (``LOSS_RTOL``), and the weights within
  ``TWO_PROCESS_ATOL``: the gradients are averaged by an all-reduce instead of one batch mean, and Adam turns a
  rounding difference in a near-zero gradient into up to a whole step (lr = 1e-4) for that weight; measured max
  |difference| after 6 steps: 1.4e-5, against 6e-4 a weight can move in 6 steps;
- a run killed (SIGKILL) after a checkpoint and resumed with ``--resume latest`` ends bit-identical to an
  uninterrupted run on one process, and within ``TWO_PROCESS_ATOL`` of it on two;
- the exported encoder loads with ``models/encoders/loader`` as the IDFuse kind, with the run's metadata.

accelerate 1.x starts ONE process for ``--cpu --num_processes 2`` (its CPU multi-process path needs an MPI
hostfile): two CPU processes are ``--multi_gpu --num_processes 2`` on the launcher and ``--cpu`` on the script.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_checkpoint import write_tiny_checkpoint, write_tiny_dataset

PACK = Path(__file__).resolve().parents[2]
SCRIPT = PACK / "scripts" / "train_id_encoder.py"
LAUNCHER = PACK / "tests" / "support" / "tiny_checkpoint.py"
STEPS, SAVE_EVERY = 6, 2
TWO_PROCESS_ATOL = 5e-5
LOSS_RTOL = 1e-6
RUN_TIMEOUT = 600  # a shared 2-core machine can be very busy
# A small encoder: the run is about the loop, not the encoder's size.
SMALL_ENCODER = ["--clip-mapper-dim", "64", "--clip-mapper-depth", "1", "--face-hidden-dim", "64", "--ff-mult", "1",
                 "--num-clip-tokens", "2", "--num-face-tokens", "2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder-runs")
    checkpoint = write_tiny_checkpoint(root / "tiny_sd15.safetensors")
    data = write_tiny_dataset(root / "faces", [[3, 2, 4], [2, 3], [3, 3, 2]])
    return root, checkpoint, data


def command(processes: int, checkpoint: Path, data: Path, output: Path, batch_size: int, *extra: str) -> list[str]:
    script = [str(LAUNCHER), str(SCRIPT), "--checkpoint", str(checkpoint), "--data", str(data), "--output",
              str(output), "--cpu", "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--batch-size",
              str(batch_size), "--validation-identities", "1", "--log-every", "1", "--seed", "3", *SMALL_ENCODER,
              *extra]
    if processes == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), *script]


def free_port() -> int:
    """A port no one listens on now (other test sessions may run on the machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment() -> dict[str, str]:
    # One thread per process: two processes on a shared machine, and reproducible float sums.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=environment(), cwd=PACK)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def run_killed_after_checkpoint(cmd: list[str], output: Path, step: int) -> None:
    """Start the run and SIGKILL it (launcher and workers) as soon as the checkpoint of ``step`` is complete."""
    marker = output / "checkpoints" / f"step_{step:06d}" / "idfuse_progress.json"
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment(),
                               cwd=PACK, start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while not marker.is_file():
            assert process.poll() is None, f"the run ended before its checkpoint: {process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (output / "checkpoints" / f"step_{STEPS:06d}").exists(), "killed too late: the run had finished"


def encoder_weights(output: Path) -> dict[str, torch.Tensor]:
    from comfyui_idfuse.models.encoders.loader import load_id_encoder

    return load_id_encoder(output / "idfuse_encoder.safetensors").state_dict()


def optimizer_moments(output: Path) -> list[torch.Tensor]:
    state = torch.load(output / "checkpoints" / f"step_{STEPS:06d}" / "optimizer.bin", weights_only=True)
    return [entry[name] for _, entry in sorted(state["state"].items()) for name in ("exp_avg", "exp_avg_sq")]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def tracked(output: Path) -> dict[str, list[tuple[int, float]]]:
    """What the run logged to TensorBoard: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = output.glob("logs/*/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def progress(output: Path, step: int) -> dict:
    return json.loads((output / "checkpoints" / f"step_{step:06d}" / "idfuse_progress.json").read_text())


@pytest.fixture(scope="module")
def one_process(inputs):
    root, checkpoint, data = inputs
    output = root / "one"
    run(command(1, checkpoint, data, output, 2))
    return output


@pytest.fixture(scope="module")
def two_processes(inputs):
    root, checkpoint, data = inputs
    output = root / "two"
    run(command(2, checkpoint, data, output, 1))
    return output


def test_the_exported_encoder_loads_as_idfuse_with_its_metadata(one_process, inputs):
    from comfyui_idfuse.models.encoders.loader import load_id_encoder
    from comfyui_idfuse.models.training import face_shards

    encoder = load_id_encoder(one_process / "idfuse_encoder.safetensors")
    assert (encoder.kind, encoder.family, encoder.embedding_space) == ("idfuse", "sd15", "dlib-resnet-128")
    assert (encoder.face_mapper.num_tokens, encoder.clip_mapper.num_latents) == (2, 2)
    from safetensors import safe_open

    with safe_open(one_process / "idfuse_encoder.safetensors", "pt") as f:
        training = json.loads(f.metadata()["training"])
    assert training["steps"] == STEPS and training["family"] == "sd15"
    assert training["data_index_hash"] == face_shards.read_index(inputs[2])["index_hash"]
    assert training["ema"] is False and training["global_batch"] == 2 and training["processes"] == 1
    assert training["settings"]["batch_size"] == 2 and training["settings"]["text_attention"] == "off"
    logged = tracked(one_process)
    assert {"loss", "lr", "grad_norm", "data_wait_share"} <= logged.keys()
    assert all(0.0 <= share <= 1.0 for _, share in logged["data_wait_share"])
    assert all(value == pytest.approx(1e-4) for _, value in logged["lr"])
    # One file per checkpoint, the same weights as the last one at the end.
    steps = sorted(p.name for p in one_process.glob("idfuse_encoder_step_*.safetensors"))
    assert steps == [f"idfuse_encoder_step_{s:06d}.safetensors" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
    last = load_id_encoder(one_process / f"idfuse_encoder_step_{STEPS:06d}.safetensors").state_dict()
    assert max_difference(last, encoder.state_dict()) == 0.0
    # Training moved the weights away from the first checkpoint's.
    first = load_id_encoder(one_process / f"idfuse_encoder_step_{SAVE_EVERY:06d}.safetensors").state_dict()
    assert max_difference(first, last) > 0.0


def test_two_processes_hold_identical_weights_and_match_one_process(one_process, two_processes):
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        fingerprints = progress(two_processes, step)["weights_fingerprints"]
        assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    assert progress(two_processes, STEPS)["global_batch"] == progress(one_process, STEPS)["global_batch"] == 2
    one, two = tracked(one_process), tracked(two_processes)
    for tag in ("loss", "grad_norm"):
        assert [s for s, _ in one[tag]] == [s for s, _ in two[tag]] == list(range(1, STEPS + 1))
        assert [v for _, v in two[tag]] == pytest.approx([v for _, v in one[tag]], rel=LOSS_RTOL)
    difference = max_difference(encoder_weights(one_process), encoder_weights(two_processes))
    assert difference <= TWO_PROCESS_ATOL, difference
    moved = max_difference(encoder_weights(one_process),
                           encoder_weights_at(one_process, SAVE_EVERY))
    assert moved > 5 * TWO_PROCESS_ATOL  # 4 steps of lr 1e-4: well above the tolerance


def encoder_weights_at(output: Path, step: int) -> dict[str, torch.Tensor]:
    from comfyui_idfuse.models.encoders.loader import load_id_encoder

    return load_id_encoder(output / f"idfuse_encoder_step_{step:06d}.safetensors").state_dict()


def test_a_killed_and_resumed_run_ends_bit_identical_on_one_process(inputs, one_process):
    root, checkpoint, data = inputs
    output = root / "killed-one"
    run_killed_after_checkpoint(command(1, checkpoint, data, output, 2), output, SAVE_EVERY)
    run(command(1, checkpoint, data, output, 2, "--resume", "latest"))
    assert max_difference(encoder_weights(output), encoder_weights(one_process)) == 0.0
    for resumed, uninterrupted in zip(optimizer_moments(output), optimizer_moments(one_process), strict=True):
        assert torch.equal(resumed, uninterrupted)


def test_a_killed_and_resumed_two_process_run_matches(inputs, two_processes):
    root, checkpoint, data = inputs
    output = root / "killed-two"
    run_killed_after_checkpoint(command(2, checkpoint, data, output, 1), output, SAVE_EVERY)
    run(command(2, checkpoint, data, output, 1, "--resume", "latest"))
    fingerprints = progress(output, STEPS)["weights_fingerprints"]
    assert fingerprints[0] == fingerprints[1]
    difference = max_difference(encoder_weights(output), encoder_weights(two_processes))
    assert difference <= TWO_PROCESS_ATOL, difference
