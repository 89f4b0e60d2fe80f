"""Per-step time and peak memory of IDFuse Train Identity against ComfyUI's own Train LoRA node.

Both trainers get the same random-weight UNet of the real SD1.5 layout (full width, same seed),
the same 256x256 photo (32x32 latent, encoded by the same random-weight VAE of the real SD VAE
layout), batch 1, LoRA rank 16, AdamW, float32:

- ours (``IDFuseTrainIdentity``): the SeFi-IDE identity tokens (the generator block that makes the
  per-stage K/V word vectors) + a rank-16 LoRA on the cross-attention ``to_k``/``to_v`` (forward
  hooks), the attention loss on the loss layers ('2, 4'; ``face_mask`` with a given MASK, or
  ``reference_prompt``), and per step two CLIP encodes (K and V prompts; the CLIP is the tests'
  narrow one with the real tokenizer and widths).
- core (``TrainLoraNode``, comfy_extras/nodes_train.py): a rank-16 LoRA on EVERY weight of the
  model with >= 2 dimensions (all Linear and Conv2d layers: attention, feed-forward, ResBlock
  convs, projections, time embedding) plus a full-size trainable difference for every 1-D
  weight (the norms) and every bias; each forward materialises W + up @ down for every layer.
  Its conditioning comes from the same CLIP (CLIPTextEncode of a training prompt).

Each run is a fresh subprocess (this file with --which), runs alternate ours / core, the median
of each is kept (and the fastest run of each, best_ratio; runs during which the torch threads got
less than 75 % of the cores are named in busy_runs and a warning). Per-step time: a global optimiser-step hook stamps the end of every step; the
first --warmup steps (model loading, first allocations) are left out: (t_N - t_W) / (N - W).
Memory (CPU): the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) above its RSS
right before the node is called, i.e. everything the node allocates: ``peak`` for the whole
call (set-up such as our VAE encode and before/after evaluation included), ``loop_peak`` for the
timed steps only. On CUDA it would be torch.cuda.max_memory_allocated above the allocation
before the call.

Gradient checkpointing is off for both unless --gradient-checkpointing (core's default is on,
ours off). The factories build weights outside inference mode; ComfyUI's checkpoint loaders run
under torch.inference_mode, so real weights are inference tensors: --inference-weights builds
them that way (our trainer then copies them so autograd may save them, which counts as its memory).

The last line printed is a JSON object: ours_step_s, core_step_s, ratio (ours / core),
ours_peak_mb, core_peak_mb, memory_ratio, and the settings. Needs a full ComfyUI (with
comfy_extras/nodes_train.py): ``COMFYUI_PATH=/path/to/ComfyUI python bench/trainer_step.py``
(exit 2 without one). About 8 minutes on 2 CPU cores, most of it the core trainer's steps.

    python bench/trainer_step.py [--warmup 2] [--timed 4] [--repeats 3] [--attention-mode face_mask]
                                 [--gradient-checkpointing] [--inference-weights] [--clip narrow|full]
                                 [--profile ours|core]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

import comfy_env  # noqa: E402

TRAINERS = ("ours", "core")
BUSY_CPU_UTIL = 0.75  # a run whose torch threads computed less than this share of the time shared the cores
PROMPT = "a photo of the face of sks person"  # core's caption; ours uses its own templates
# The default SD1.x VAE of comfy/sd.py (AutoencoderKL, 83 M parameters).
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


# --- memory -----------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


class PeakMemory:
    """Peak memory above a baseline: CUDA allocator statistics, or the process's RSS high-water mark."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.device = device
        if not self.cuda and not os.access("/proc/self/clear_refs", os.W_OK):
            raise SystemExit("trainer_step: needs Linux's /proc/self/clear_refs to reset the peak RSS")

    def current(self) -> float:
        if self.cuda:
            return self.torch.cuda.memory_allocated(self.device) / 2 ** 20
        return _status_kb("VmRSS") / 1024

    def peak(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        return _status_kb("VmHWM") / 1024

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # resets VmHWM to the current RSS


# --- one trainer in this process ---------------------------------------------------------------


def _photo(size: int):
    """A bluish background with a skin-coloured 'face' block, and its mask (the tests' photo, larger)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    image = 0.1 * torch.rand(1, size, size, 3, generator=gen) + torch.tensor([0.1, 0.2, 0.6])
    top, bottom, left, right = size // 4, 3 * size // 4, 5 * size // 16, 11 * size // 16
    image[:, top:bottom, left:right] = (0.1 * torch.rand(1, bottom - top, right - left, 3, generator=gen)
                                        + torch.tensor([0.9, 0.7, 0.5]))
    mask = torch.zeros(1, size, size)
    mask[:, top:bottom, left:right] = 1.0
    return image, mask


def _vae():
    """A ComfyUI VAE of the real SD1.x layout with random weights (what CheckpointLoaderSimple makes)."""
    import comfy.sd
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from factories import init_weights

    module = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    init_weights(module, seed=3)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    del module
    vae = comfy.sd.VAE(sd=state, config={"params": {"embed_dim": 4, "ddconfig": SD_VAE}}, dtype=torch.float32)
    return vae


def _full_clip():
    """A ComfyUI CLIP with the real SD1.x text encoder (CLIP-L, 12 layers, 123 M parameters), random weights."""
    import comfy.sd
    import comfy.sd1_clip
    import torch
    from factories import init_weights

    class Target:
        params: dict = {}
        clip = comfy.sd1_clip.SD1ClipModel  # SDClipModel's own config: CLIP ViT-L/14's text model
        tokenizer = comfy.sd1_clip.SD1Tokenizer  # ComfyUI's own sd1_tokenizer files

    clip = comfy.sd.CLIP(Target, embedding_directory=None, model_options={"dtype": torch.float32})
    init_weights(clip.cond_stage_model, seed=0)
    return clip


def _release_free_heap() -> None:
    """Give memory freed during set-up back to the system (glibc), so the node's growth is not
    served from pages the process already holds."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _defaults(node_class) -> dict:
    required = node_class.INPUT_TYPES()["required"]
    return {name: spec[1]["default"] for name, spec in required.items()
            if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}


def _call(node_class, kwargs: dict):
    """A V1 node through its FUNCTION, a V3 node (comfy_api io.ComfyNode) through execute."""
    function = getattr(node_class, "FUNCTION", None)
    if function:
        return getattr(node_class(), function)(**kwargs)
    output = node_class.execute(**kwargs)
    return getattr(output, "result", output)


def worker(args) -> dict:
    install = comfy_env.setup_comfy()
    if not install.is_full:
        raise SystemExit("trainer_step: the worker needs a full ComfyUI")
    import comfy.model_management
    import folder_paths
    import torch
    from comfy_extras.nodes_train import TrainLoraNode
    from factories import make_clip, make_model
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import nodes as comfy_nodes  # ComfyUI's nodes.py: setup_comfy put its root first on sys.path
    from comfyui_idfuse.nodes.train import IDFuseTrainIdentity

    out_dir = tempfile.mkdtemp(prefix="idfuse-bench-train-")
    folder_paths.models_dir = out_dir  # our token files go to <out_dir>/idfuse/tokens
    folder_paths.folder_names_and_paths["loras"] = ([os.path.join(out_dir, "loras")], {".safetensors"})

    torch.manual_seed(0)
    # CheckpointLoaderSimple loads under torch.inference_mode (weights become inference tensors);
    # make_model does not. --inference-weights builds everything the way a real checkpoint is loaded.
    with torch.inference_mode(args.inference_weights):
        model = make_model("sd15", model_channels=320)  # the real SD1.5 UNet shape, random weights
        if args.clip == "full":
            clip = _full_clip()
        else:
            clip = make_clip("sd15", comfy_env.clip_tokenizer_dir(install))
        vae = _vae()
    image, mask = _photo(args.size)
    with torch.inference_mode(), torch.random.fork_rng():  # as ComfyUI runs nodes
        torch.manual_seed(0)
        (latent,) = comfy_nodes.VAEEncode().encode(vae, image)
        (positive,) = comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)
    steps = args.warmup + args.timed

    if args.which == "ours":
        node_class = IDFuseTrainIdentity
        kwargs = dict(_defaults(IDFuseTrainIdentity), model=model, clip=clip, vae=vae, images=image, masks=mask)
        kwargs.update(steps=steps, attention_mode=args.attention_mode, loss_layers="2, 4", lora_rank=args.rank,
                      lora_targets="to_k, to_v", augmentation="none", resolution=args.size, batch_size=1,
                      gradient_accumulation=1, gradient_checkpointing=args.gradient_checkpointing,
                      training_dtype="float32", seed=0, save_name="bench", checkpoint_every=0, resume_from="none",
                      lr_schedule="constant", warmup_steps=0, min_snr_gamma=0.0)
    else:
        node_class = TrainLoraNode
        kwargs = dict(_defaults(TrainLoraNode), model=model, latents=latent, positive=positive)
        kwargs.update(batch_size=1, grad_accumulation_steps=1, steps=steps, rank=args.rank, optimizer="AdamW",
                      loss_function="MSE", seed=0, training_dtype="fp32", lora_dtype="fp32", algorithm="LoRA",
                      gradient_checkpointing=args.gradient_checkpointing, existing_lora="[None]")

    memory = PeakMemory(comfy.model_management.get_torch_device())
    stamps: list[float] = []
    cpu_stamps: list[float] = []  # CPU time of all the process's threads: tells a busy machine apart
    phases = {"trainable_params": 0, "setup_peak": 0.0, "loop_peak": 0.0}
    profilers: list = []

    def on_step(optimizer, _args, _kwargs) -> None:
        stamps.append(time.perf_counter())
        cpu_stamps.append(time.process_time())
        if len(stamps) == 1:
            phases["trainable_params"] = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        if len(stamps) == args.warmup:
            phases["setup_peak"] = memory.peak()
            memory.reset()
            if args.profile == args.which:
                profilers.extend(_start_profilers())
        if len(stamps) == steps:
            phases["loop_peak"] = memory.peak()
            if profilers:
                _stop_profilers(profilers, args.timed)

    gc.collect()
    _release_free_heap()
    baseline = memory.current()
    memory.reset()
    hook = register_optimizer_step_post_hook(on_step)
    started = time.perf_counter()
    try:
        with torch.inference_mode():  # as ComfyUI's executor runs nodes
            _call(node_class, kwargs)
    finally:
        hook.remove()
        shutil.rmtree(out_dir, ignore_errors=True)
    total = time.perf_counter() - started
    if len(stamps) != steps:
        raise SystemExit(f"trainer_step: expected {steps} optimiser steps from {args.which}, saw {len(stamps)}")
    whole_peak = max(phases["setup_peak"], memory.peak())
    intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][args.warmup - 1:]
    return {
        "which": args.which,
        "step_s": (stamps[-1] - stamps[args.warmup - 1]) / args.timed,
        "step_times_s": [round(t, 4) for t in intervals],
        # Share of the wall time the torch threads were computing during the timed steps: about 1 on an
        # idle machine, lower when other processes take the cores.
        "cpu_util": (cpu_stamps[-1] - cpu_stamps[args.warmup - 1]) / (stamps[-1] - stamps[args.warmup - 1])
        / torch.get_num_threads(),
        "peak_mb": whole_peak - baseline,
        "loop_peak_mb": phases["loop_peak"] - baseline,
        "baseline_mb": baseline,
        "first_steps_s": stamps[args.warmup - 1] - started,  # set-up + warm-up steps
        "after_loop_s": started + total - stamps[-1],  # our evaluation and files; core's clean-up
        "trainable_params": phases["trainable_params"],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(comfy.model_management.get_torch_device()),
    }


def _start_profilers() -> list:
    import cProfile

    import torch

    profile = cProfile.Profile()
    torch_profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    torch_profile.start()
    profile.enable()
    return [profile, torch_profile]


def _stop_profilers(profilers: list, steps: int) -> None:
    import pstats

    profile, torch_profile = profilers
    profile.disable()
    torch_profile.stop()
    print(f"--- cProfile over {steps} timed steps (cumulative) ---", file=sys.stderr)
    pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(45)
    print(f"--- torch.profiler over {steps} timed steps ---", file=sys.stderr)
    print(torch_profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
    print(torch_profile.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=15), file=sys.stderr)
    profilers.clear()


# --- the comparison ----------------------------------------------------------------------------


def run_worker(which: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--which", which, "--warmup", str(args.warmup),
           "--timed", str(args.timed), "--size", str(args.size), "--rank", str(args.rank),
           "--attention-mode", args.attention_mode, "--clip", args.clip, "--profile", args.profile]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if args.inference_weights:
        cmd.append("--inference-weights")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if args.profile == which:
        sys.stderr.write(result.stderr)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        sys.stderr.write(result.stderr[-8000:])
        raise SystemExit(f"trainer_step: the {which} run failed (exit {result.returncode})")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing (>= 1)")
    parser.add_argument("--timed", type=int, default=4, help="steps timed after the warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each trainer (alternating)")
    parser.add_argument("--size", type=int, default=256, help="photo size in pixels (latent = size / 8)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--attention-mode", default="face_mask", choices=("face_mask", "reference_prompt", "both"))
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on for both trainers (core's "
                        "default is on, ours off; off for both unless given)")
    parser.add_argument("--clip", default="narrow", choices=("narrow", "full"), help="our trainer's text encoder: "
                        "the tests' narrow CLIP-L (real tokenizer and widths, 3 small layers) or the real-size one")
    parser.add_argument("--inference-weights", action="store_true", help="create the weights under "
                        "torch.inference_mode, as ComfyUI's checkpoint loaders do")
    parser.add_argument("--profile", default="none", choices=("none", *TRAINERS),
                        help="profile that trainer's timed steps (cProfile + torch.profiler, to stderr)")
    parser.add_argument("--which", choices=TRAINERS, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.warmup < 1 or args.timed < 1:
        parser.error("--warmup and --timed must be at least 1")

    install = comfy_env.find_comfy()
    if not install.is_full or not (install.root / "comfy_extras" / "nodes_train.py").is_file():
        print(f"trainer_step: needs a full ComfyUI with comfy_extras/nodes_train.py (TrainLoraNode); found "
              f"{install.kind} ComfyUI at {install.root}. Set COMFYUI_PATH to a ComfyUI checkout.", file=sys.stderr)
        sys.exit(2)
    if args.which:
        print(json.dumps(worker(args)))
        return

    runs: dict[str, list[dict]] = {name: [] for name in TRAINERS}
    for i in range(args.repeats):
        for which in TRAINERS:
            run = run_worker(which, args)
            runs[which].append(run)
            print(f"repeat {i + 1} {which}: {run['step_s']:.3f} s/step (steps {run['step_times_s']}, CPU use "
                  f"{run['cpu_util']:.2f}), peak "
                  f"+{run['peak_mb']:.0f} MB (timed steps +{run['loop_peak_mb']:.0f} MB), set-up + warm-up "
                  f"{run['first_steps_s']:.1f} s, after {run['after_loop_s']:.1f} s, "
                  f"{run['trainable_params']:,} trainable parameters", flush=True)

    def median(which: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[which])

    busy = [f"{r['which']} {i + 1}" for i in range(args.repeats) for r in (runs["ours"][i], runs["core"][i])
            if r["cpu_util"] < BUSY_CPU_UTIL]
    if busy:
        print(f"trainer_step: WARNING: the machine was busy during run(s) {', '.join(busy)} (CPU use below "
              f"{BUSY_CPU_UTIL}); their times are inflated. Compare best_ratio, or run again.", file=sys.stderr)
    ours_step, core_step = median("ours", "step_s"), median("core", "step_s")
    ours_best = min(r["step_s"] for r in runs["ours"])
    core_best = min(r["step_s"] for r in runs["core"])
    ours_peak, core_peak = median("ours", "peak_mb"), median("core", "peak_mb")
    first = runs["ours"][0]
    print(json.dumps({
        "ours_step_s": round(ours_step, 4), "core_step_s": round(core_step, 4),
        "ratio": round(ours_step / core_step, 4),
        "ours_best_step_s": round(ours_best, 4), "core_best_step_s": round(core_best, 4),
        "best_ratio": round(ours_best / core_best, 4),  # fastest run of each: robust to bursts of load
        "ours_cpu_util": round(median("ours", "cpu_util"), 3), "core_cpu_util": round(median("core", "cpu_util"), 3),
        "busy_runs": busy,
        "ours_peak_mb": round(ours_peak, 1), "core_peak_mb": round(core_peak, 1),
        "memory_ratio": round(ours_peak / core_peak, 4),
        "ours_loop_peak_mb": round(median("ours", "loop_peak_mb"), 1),
        "core_loop_peak_mb": round(median("core", "loop_peak_mb"), 1),
        "ours_trainable_params": first["trainable_params"],
        "core_trainable_params": runs["core"][0]["trainable_params"],
        "warmup_steps": args.warmup, "timed_steps": args.timed, "repeats": args.repeats,
        "resolution": args.size, "latent": args.size // 8, "batch": 1, "rank": args.rank,
        "attention_mode": args.attention_mode, "gradient_checkpointing": args.gradient_checkpointing,
        "clip": args.clip, "inference_weights": args.inference_weights,
        "dtype": "float32", "device": first["device"], "torch": first["torch"],
        "torch_threads": first["torch_threads"], "comfyui": str(install.root),
    }))


if __name__ == "__main__":
    main()
