"""Per-step time and peak memory of IDFuse's ID-encoder training step against the reference training loop of
IP-Adapter FaceID-Plus in diffusers, and the share of our step spent waiting for data.

Both sides train on the same batches, read by our pair loader (``models/training/encoder_data.PairLoader``, its
default read-ahead thread) from a small dataset of WebDataset shards written once with the shard writer
(``models/training/face_shards``): synthetic identities with everything a prepared dataset holds (unit face
embeddings [512], 256 x 256 PNG training crops, their VAE latents [4, 32, 32], CLIP features [257, 1280] in
float16). Resolution 256 x 256 (32 x 32 latents), float32, on the CPU, AdamW (lr 1e-4, weight decay 0.01),
gradient clipping at 1.0 on both sides:

- ours: ``EncoderTraining`` (models/training/encoder_trainer.py) with ``training_denoiser``
  (nodes/glue/encoder_training.py) on ComfyUI's own ``UNetModel`` of the real SD1.5 layout (random weights,
  frozen), text cross-attention off (the paper's identity-enhanced training, the default); trainable: a new
  IDFuse encoder with the default sizes (face mapper, CLIP mapper with its own queries, every layer's ID K/V).
- reference: diffusers' ``UNet2DConditionModel`` of the SD1.5 config (built offline, random weights, frozen),
  diffusers' own ``IPAdapterAttnProcessor2_0`` on every cross-attention layer (``set_attn_processor``) and
  ``IPAdapterFaceIDPlusImageProjection`` as the UNet's image projection, the loop of IP-Adapter's training
  script (DDPM noise at a random timestep, eps MSE) with the text attention on, as IP-Adapter trains; trainable:
  the face mapper + CLIP mapper (the projection) and every layer's to_k_ip / to_v_ip. Its text context is one
  fixed [B, 77, 768] tensor standing for the frozen text encoder's output (the script runs the text encoder
  every step; left out so both sides time the UNet and the encoder only).

Each run is a fresh subprocess (this file with --which), runs alternate ours / reference, and the median of
each is kept. Step time: wall time of a whole iteration (waiting for the batch + forward + backward + optimiser
step) over the steps after --warmup. data_wait_share: our time waiting for the loader / our step time. Memory:
the subprocess's RSS high-water mark (VmHWM, reset through /proc/self/clear_refs once the models are built)
above its RSS at that point, i.e. what the training steps allocate (activations, gradients, optimiser state).

The last line printed is a JSON object: ours_step_s, reference_step_s, ratio (ours / reference), ours_peak_mb,
reference_peak_mb, memory_ratio, data_wait_share, and the settings. Runs on the pinned test core or a full
ComfyUI (COMFYUI_PATH). About 10 minutes on 2 CPU cores with the defaults.

    python bench/encoder_train_step.py [--batch 2] [--warmup 1] [--timed 3] [--repeats 3]
                                       [--gradient-checkpointing]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

import comfy_env  # noqa: E402
from trainer_step import PeakMemory, _release_free_heap  # noqa: E402  (bench/: the one home of peak memory)

SIDES = ("ours", "reference")
SIZE = 256  # pixels; latents 32 x 32
LATENT_CHANNELS = 4
SD15_LATENT_SCALE = 0.18215  # SD1.x VAE scaling (ComfyUI's process_latent_in, diffusers' vae.config.scaling_factor)
CONTEXT = 768
PHOTOS_PER_IDENTITY = 4
IDENTITIES_PER_SHARD = 4
MAX_GRAD_NORM = 1.0
# diffusers' UNet2DConditionModel with runwayml/stable-diffusion-v1-5's unet/config.json values.
SD15_DIFFUSERS_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": CONTEXT, "attention_head_dim": 8,
    "norm_num_groups": 32, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
}
FACEID_PLUS_TOKENS = 4  # IP-Adapter FaceID-Plus: 4 ID tokens (the face tokens, refined by the resampler)


# --- the dataset ---------------------------------------------------------------------------------------------


def write_dataset(folder: Path, identities: int) -> Path:
    """A small dataset in the prepared format, written with the pack's shard writer (synthetic content)."""
    import torch

    from comfyui_idfuse.models.faces.types import ARCFACE_W600K_512
    from comfyui_idfuse.models.training import face_shards

    gen = torch.Generator().manual_seed(0)
    samples = []
    for position in range(identities):
        n = PHOTOS_PER_IDENTITY
        samples.append(face_shards.IdentitySample(
            identity=f"person{position:03d}", photos=[f"person{position:03d}/{i}.jpg" for i in range(n)],
            face_embeddings=torch.nn.functional.normalize(torch.randn(n, 512, generator=gen), dim=-1),
            embedding_space=ARCFACE_W600K_512,
            images=(torch.rand(n, SIZE, SIZE, 3, generator=gen) * 255).to(torch.uint8),
            latents=torch.randn(n, LATENT_CHANNELS, SIZE // 8, SIZE // 8, generator=gen),
            clip_hidden=torch.randn(n, 257, 1280, generator=gen).half(), key=face_shards.sample_key(position)))
    shard_count = 0
    for shard, first in enumerate(range(0, identities, IDENTITIES_PER_SHARD)):
        members = samples[first:first + IDENTITIES_PER_SHARD]
        sha = face_shards.write_shard(folder / face_shards.shard_name(shard), members)
        face_shards.write_part(folder, shard, {
            "shard": face_shards.shard_name(shard), "sha256": sha, "skipped_photos": [], "skipped_identities": [],
            "identities": [{"name": s.identity, "photos": len(s)} for s in members]})
        shard_count += 1
    face_shards.save_clip_unconditional(folder, torch.randn(1, 257, 1280, generator=gen))
    header = {"embedding_space": ARCFACE_W600K_512, "backend": "synthetic (bench)", "resolution": SIZE,
              "images": True, "latents": True, "clip": True, "settings": {}}
    face_shards.merge_index(folder, header, shard_count)
    return folder


def pair_batches(data: Path, batch: int, steps: int):
    """Our loader's micro-batches of steps [0, steps): one process, ``batch`` samples per step."""
    from comfyui_idfuse.models.training import face_shards
    from comfyui_idfuse.models.training.encoder_data import PairLoader, PairPlan, ProcessShare, identities_of

    plan = PairPlan(identities_of(face_shards.read_index(data), data), global_batch=batch, seed=0)
    return PairLoader(data, plan, ProcessShare(rank=0, world_size=1, batch_size=batch))(0, steps)


# --- one side in this process --------------------------------------------------------------------------------


def _trainable_count(parameters) -> int:
    return sum(p.numel() for p in parameters)


def ours(args, data: Path, stack: ExitStack):
    """Our step on ComfyUI's SD1.5 UNet: (step function, trainable parameter count)."""
    import torch
    from factories import make_model

    from comfyui_idfuse.models.encoders import create_idfuse_encoder
    from comfyui_idfuse.models.training.encoder_settings import EncoderTrainingSettings
    from comfyui_idfuse.models.training.encoder_trainer import EncoderTraining, PairBatch
    from comfyui_idfuse.models.training.face_shards import clip_unconditional
    from comfyui_idfuse.nodes.glue.encoder_training import training_denoiser

    settings = EncoderTrainingSettings(batch_size=args.batch, resolution=SIZE,
                                       gradient_checkpointing=args.gradient_checkpointing,
                                       max_grad_norm=MAX_GRAD_NORM)
    model = make_model("sd15", model_channels=320)  # the real SD1.5 UNet layout, random weights
    denoiser = training_denoiser(model, settings)
    encoder = create_idfuse_encoder(denoiser.family, denoiser.hidden_sizes, num_face_tokens=settings.num_face_tokens,
                                    num_clip_tokens=settings.num_clip_tokens)
    training = EncoderTraining(encoder, denoiser, settings, clip_unconditional(data))
    parameters = training.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    stack.enter_context(denoiser)

    def step(samples, index: int) -> float:
        batch = PairBatch(samples.sample_ids, samples.reference_faces, samples.reference_clip.float(),
                          denoiser.process_latent_in(samples.target_latents))
        loss = training(batch, index)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, _trainable_count(parameters)


def reference(args, data: Path, stack: ExitStack):
    """IP-Adapter FaceID-Plus's training loop in diffusers: (step function, trainable parameter count)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection, MultiIPAdapterImageProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_DIFFUSERS_UNET)  # random weights, nothing downloaded
    unet.requires_grad_(False)
    processors = {}
    for name, module in unet.attn_processors.items():
        del module
        attention = unet.get_submodule(name.removesuffix(".processor"))
        if name.endswith("attn1.processor"):
            processors[name] = AttnProcessor2_0()
        else:
            processors[name] = IPAdapterAttnProcessor2_0(attention.to_q.out_features, CONTEXT,
                                                         num_tokens=(FACEID_PLUS_TOKENS,), scale=1.0)
    unet.set_attn_processor(dict(processors))  # diffusers empties the dict it is given
    # FaceID-Plus's image projection (ProjPlusModel: face MLP + FacePerceiverResampler), as diffusers loads it.
    projection = IPAdapterFaceIDPlusImageProjection(embed_dims=CONTEXT, output_dims=CONTEXT, hidden_dims=1280,
                                                    id_embeddings_dim=512, depth=4, dim_head=64, heads=CONTEXT // 64,
                                                    num_tokens=FACEID_PLUS_TOKENS, ffproj_ratio=2)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    unet.config.encoder_hid_dim_type = "ip_image_proj"  # what diffusers' IP-Adapter loader sets
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    parameters = list(projection.parameters()) + [p for proc in processors.values()
                                                  if isinstance(proc, IPAdapterAttnProcessor2_0)
                                                  for p in proc.parameters()]
    ip_layers = sum(isinstance(proc, IPAdapterAttnProcessor2_0) for proc in processors.values())
    if ip_layers != 16:  # SD1.5's cross-attention layers
        raise SystemExit(f"encoder_train_step: {ip_layers} IP-Adapter attention processors installed, expected 16")
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.01)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    text_context = torch.randn(args.batch, 77, CONTEXT, generator=torch.Generator().manual_seed(1))

    def step(samples, index: int) -> float:
        latents = samples.target_latents * SD15_LATENT_SCALE
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        projection.clip_embeds = samples.reference_clip.float()[:, None]  # [B, 1, 257, 1280]
        prediction = unet(noisy, timesteps, text_context[:latents.shape[0]],
                          added_cond_kwargs={"image_embeds": [samples.reference_faces[:, None]]}).sample
        loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, _trainable_count(parameters)


def worker(args) -> dict:
    # The same attention as the training script on a CPU (scripts/host.py CPU_ARGS), and as diffusers uses.
    comfy_env.setup_comfy(extra_args=("--use-pytorch-cross-attention",))
    import comfy.model_management
    import torch

    data = Path(args.data)
    steps = args.warmup + args.timed
    with ExitStack() as stack:
        step, trainable = (ours if args.which == "ours" else reference)(args, data, stack)
        batches = pair_batches(data, args.batch, steps)
        memory = PeakMemory(comfy.model_management.get_torch_device())
        gc.collect()
        _release_free_heap()
        baseline = memory.current()
        memory.reset()
        times, waits, cpu, losses = [], [], [], []
        for index in range(steps):
            started, cpu_started = time.perf_counter(), time.process_time()
            samples = next(batches)
            got = time.perf_counter()
            losses.append(step(samples, index))
            times.append(time.perf_counter() - started)
            waits.append(got - started)
            cpu.append(time.process_time() - cpu_started)
        peak = memory.peak() - baseline
    timed = slice(args.warmup, steps)
    step_s = statistics.fmean(times[timed])
    return {
        "which": args.which, "step_s": step_s, "step_times_s": [round(t, 4) for t in times],
        "data_wait_share": sum(waits[timed]) / sum(times[timed]),
        "cpu_util": sum(cpu[timed]) / sum(times[timed]) / torch.get_num_threads(),
        "peak_mb": peak, "baseline_mb": baseline, "trainable_params": trainable,
        "losses": [round(v, 5) for v in losses], "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "device": str(comfy.model_management.get_torch_device()),
    }


# --- the comparison ------------------------------------------------------------------------------------------


def run_worker(which: str, args, data: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--which", which, "--data", str(data), "--batch",
           str(args.batch), "--warmup", str(args.warmup), "--timed", str(args.timed)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    result = subprocess.run(cmd, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        sys.stderr.write(result.stderr[-8000:])
        raise SystemExit(f"encoder_train_step: the {which} run failed (exit {result.returncode})")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2, help="samples per step (both sides)")
    parser.add_argument("--warmup", type=int, default=1, help="steps left out of the timing (>= 1)")
    parser.add_argument("--timed", type=int, default=3, help="steps timed after the warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side (alternating)")
    parser.add_argument("--identities", type=int, default=16, help="identities in the bench's dataset")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on for both sides")
    parser.add_argument("--which", choices=SIDES, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--data", help=argparse.SUPPRESS)  # worker mode: the dataset the parent wrote
    args = parser.parse_args()
    if args.warmup < 1 or args.timed < 1:
        parser.error("--warmup and --timed must be at least 1")
    if args.which:
        print(json.dumps(worker(args)))
        return

    install = comfy_env.setup_comfy()
    data = Path(tempfile.mkdtemp(prefix="idfuse-bench-faces-"))
    try:
        write_dataset(data, args.identities)
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        for repeat in range(args.repeats):
            for side in SIDES:
                run = run_worker(side, args, data)
                runs[side].append(run)
                print(f"repeat {repeat + 1} {side}: {run['step_s']:.3f} s/step (steps {run['step_times_s']}, CPU use "
                      f"{run['cpu_util']:.2f}, data wait {run['data_wait_share']:.1%}), peak +{run['peak_mb']:.0f} MB, "
                      f"{run['trainable_params']:,} trainable parameters", flush=True)
    finally:
        shutil.rmtree(data, ignore_errors=True)

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    ours_step, reference_step = median("ours", "step_s"), median("reference", "step_s")
    ours_peak, reference_peak = median("ours", "peak_mb"), median("reference", "peak_mb")
    first = runs["ours"][0]
    print(json.dumps({
        "ours_step_s": round(ours_step, 4), "reference_step_s": round(reference_step, 4),
        "ratio": round(ours_step / reference_step, 4),
        "ours_peak_mb": round(ours_peak, 1), "reference_peak_mb": round(reference_peak, 1),
        "memory_ratio": round(ours_peak / reference_peak, 4),
        "data_wait_share": round(median("ours", "data_wait_share"), 4),
        "ours_cpu_util": round(median("ours", "cpu_util"), 3),
        "reference_cpu_util": round(median("reference", "cpu_util"), 3),
        "ours_trainable_params": first["trainable_params"],
        "reference_trainable_params": runs["reference"][0]["trainable_params"],
        "batch": args.batch, "resolution": SIZE, "latent": SIZE // 8, "warmup_steps": args.warmup,
        "timed_steps": args.timed, "repeats": args.repeats, "gradient_checkpointing": args.gradient_checkpointing,
        "dtype": "float32", "device": first["device"], "torch": first["torch"],
        "torch_threads": first["torch_threads"], "comfyui": f"{install.kind} at {install.root}",
    }))


if __name__ == "__main__":
    main()
