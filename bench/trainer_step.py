"""Per-step time and peak memory of IDFuse Train Identity against ComfyUI's own Train LoRA node;
our step time with each optimiser; the cost of one round of sample images.

Both trainers get the same random-weight UNet of the real SD1.5 layout (``--family sdxl``: of the
real SDXL layout, 2.6 B parameters; full width, same seed), the same 256x256 photo (32x32 latent,
encoded by the same random-weight VAE of the real SD VAE layout), batch 1, LoRA rank 16, AdamW,
float32:

- ours (``IDFuseTrainIdentity`` with ``IDFuseTrainingOptions``): the SeFi-IDE identity tokens (the
  generator block that makes the per-stage K/V word vectors) + a rank-16 LoRA on the cross-attention
  ``to_k``/``to_v`` (forward hooks), the attention loss on the loss layers ('2, 4'; ``face_mask``
  with a given MASK, or ``reference_prompt``), and per step two CLIP encodes (K and V prompts; the
  CLIP is the tests' narrow one with the real tokenizer and widths).
- core (``TrainLoraNode``, comfy_extras/nodes_train.py): a rank-16 LoRA on EVERY weight of the
  model with >= 2 dimensions (all Linear and Conv2d layers: attention, feed-forward, ResBlock
  convs, projections, time embedding) plus a full-size trainable difference for every 1-D
  weight (the norms) and every bias; each forward materialises W + up @ down for every layer.
  Its conditioning comes from the same CLIP (CLIPTextEncode of a training prompt).

Further runs of ours, in the same alternation: one per other optimiser of --optimizers (the
Training Options' ``optimizer``; Prodigy at learning rate 1.0, its convention; an optimiser that
cannot run here, such as AdamW8bit without CUDA and bitsandbytes, is reported as unavailable with
the trainer's own reason), and, in the first --sample-repeats repeats, one with --sample-prompts
sample prompts and ``sample_every`` = all its steps, so exactly one sample round runs, after the
last timed step: its cost comes from the run's report (``timing``: sampling_seconds / sample_rounds,
per round and per image), apart from the step time.

Each run is a fresh subprocess (this file with --which), runs alternate, the median of each is kept
(and the fastest run of each, best_ratio; runs during which the torch threads got less than 75 %
of the cores are named in busy_runs and a warning). Per-step time: a global optimiser-step hook
stamps the end of every step; the first --warmup steps (model loading, first allocations) are left
out: (t_N - t_W) / (N - W). Memory (CPU): the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs) above its RSS right before the node is called, i.e. everything the node
allocates: ``peak`` for the whole call (set-up such as our VAE encode and before/after evaluation
included), ``loop_peak`` for the timed steps only. On CUDA it would be
torch.cuda.max_memory_allocated above the allocation before the call. Before each run the machine's
MemAvailable is compared with an estimate of the run's need (from the SD1.5 measurements); a run
that does not fit within --memory-wait seconds is skipped, and the JSON says so with the numbers.

Gradient checkpointing is off for both unless --gradient-checkpointing (core's default is on,
ours off). The factories build weights outside inference mode; ComfyUI's checkpoint loaders run
under torch.inference_mode, so real weights are inference tensors: --inference-weights builds
them that way (our trainer aliases their storage, no copy).

The last line printed is a JSON object: ours_step_s, core_step_s, ratio (ours / core),
ours_peak_mb, core_peak_mb, memory_ratio, the settings, and ``optimizers`` (per optimiser: step
time, its ratio to AdamW's, peak, the optimiser class the trainer really ran, or why it is
unavailable), ``sample_round`` (seconds per round and per image) and ``skipped`` runs. Needs a
full ComfyUI (with comfy_extras/nodes_train.py): ``COMFYUI_PATH=/path/to/ComfyUI python
bench/trainer_step.py`` (exit 2 without one). SD1.5 with ``--repeats 2 --sample-size 256`` takes about
17 minutes on 2 CPU cores with one torch thread (the defaults: a third repeat and a 512² sample round, longer);
the SDXL row's command (README) about 9 minutes and 22 GB of memory.

    python bench/trainer_step.py [--family sd15|sdxl] [--warmup 2] [--timed 4] [--repeats 3]
                                 [--optimizers AdamW,Prodigy,AdamW8bit] [--sample-prompts 2]
                                 [--sample-steps 12] [--sample-size 512] [--sample-repeats 1]
                                 [--attention-mode face_mask] [--gradient-checkpointing]
                                 [--inference-weights] [--clip narrow|full] [--profile ours|core]
                                 [--memory-wait 600]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

import comfy_env  # noqa: E402


def _training_settings():
    """The pack's models/training/settings.py on its own (plain Python): the main process needs its names and
    defaults, not ComfyUI (which importing the pack would load)."""
    name = "idfuse_bench_training_settings"
    spec = importlib.util.spec_from_file_location(name, comfy_env.PACK_ROOT / "models" / "training" / "settings.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_SETTINGS = _training_settings()
OPTIMIZERS, DEFAULTS = _SETTINGS.OPTIMIZERS, _SETTINGS.DEFAULTS
TRAINERS = ("ours", "core")
FAMILIES = ("sd15", "sdxl")
# The factories' UNets at the real width: SD1.5 (860 M parameters) and SDXL (2.567 B; 64-channel heads).
UNET_WIDTHS = {"sd15": {"model_channels": 320}, "sdxl": {"model_channels": 320, "num_head_channels": 64}}
UNET_PARAMS = {"sd15": 860e6, "sdxl": 2567e6}  # counted on the meta device; for the memory estimate
BUSY_CPU_UTIL = 0.75  # a run whose torch threads computed less than this share of the time shared the cores
PROMPT = "a photo of the face of sks person"  # core's caption; ours uses its own templates
SAMPLE_PROMPTS = ("a photo of sks as an astronaut, oil painting", "sks reading a book in a cafe, film photo",
                  "a portrait of sks in the rain", "sks on a mountain top, wide shot")
OPTIMIZER_LEARNING_RATES = {"Prodigy": 1.0}  # Prodigy's convention; the others use the trainer's default
# The default SD1.x VAE of comfy/sd.py (AutoencoderKL, 83 M parameters; SDXL's VAE has the same layout).
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
# Peak memory of a run above its UNet's own float32 size, as a share of that size: the largest measured (README):
# SD1.5 (UNet 3279 MB) 777-822 / 5744-8019 MB (v0.3.64-v0.8.0) without checkpointing; with it SD1.5 459 / 1593 MB,
# SDXL (9794 MB) 546 / 10037 MB; plus what the process holds besides (torch, CLIP, VAE, the photo). Only used to
# decide whether a run can fit.
PEAK_SHARE_OF_UNET = {("ours", False): 0.26, ("core", False): 2.45, ("ours", True): 0.14, ("core", True): 1.03}
PROCESS_OVERHEAD_MB = 1500


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
    """A V1 node through its FUNCTION, a V3 node (comfy_api io.ComfyNode) through execute; a node that takes
    its inputs as lists gets each one as a list of one, as ComfyUI's executor passes them."""
    if getattr(node_class, "INPUT_IS_LIST", False):
        kwargs = {name: [value] for name, value in kwargs.items()}
    function = getattr(node_class, "FUNCTION", None)
    if function:
        return getattr(node_class(), function)(**kwargs)
    output = node_class.execute(**kwargs)
    return getattr(output, "result", output)


def _our_options(args, steps: int) -> dict:
    """The Training Options dict of our run (through the node, so its checks run as in a workflow)."""
    from comfyui_idfuse.nodes.train import IDFuseTrainingOptions

    prompts = SAMPLE_PROMPTS[:args.sample_prompts]
    kwargs = dict(_defaults(IDFuseTrainingOptions))
    kwargs.update(attention_mode=args.attention_mode, loss_layers="2, 4", lora_targets="to_k, to_v",
                  augmentation="none", resolution=args.size, batch_size=1, gradient_accumulation=1,
                  gradient_checkpointing=args.gradient_checkpointing, training_dtype="float32", checkpoint_every=0,
                  lr_schedule="constant", warmup_steps=0, min_snr_gamma=0.0, optimizer=args.optimizer,
                  # sample_every = every step of the run: one round, after the last (timed) step
                  sample_prompts="\n".join(prompts), sample_every=steps if prompts else 0,
                  sample_steps=args.sample_steps, sample_size=args.sample_size, validation_loss=False)
    (options,) = _call(IDFuseTrainingOptions, kwargs)
    return options


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
    from comfyui_idfuse.models.errors import TrainingError
    from comfyui_idfuse.nodes.train import IDFuseTrainIdentity

    steps = args.warmup + args.timed
    base = {"which": args.which, "optimizer": args.optimizer, "sample_prompts": args.sample_prompts}
    if args.which == "ours":
        try:  # an optimiser that cannot run here is refused by the options' own check
            options = _our_options(args, steps)
        except TrainingError as error:
            return {**base, "unavailable": str(error)}

    out_dir = tempfile.mkdtemp(prefix="idfuse-bench-train-")
    folder_paths.models_dir = out_dir  # our token files go to <out_dir>/idfuse/tokens
    folder_paths.folder_names_and_paths["loras"] = ([os.path.join(out_dir, "loras")], {".safetensors"})

    torch.manual_seed(0)
    # CheckpointLoaderSimple loads under torch.inference_mode (weights become inference tensors);
    # make_model does not. --inference-weights builds everything the way a real checkpoint is loaded.
    with torch.inference_mode(args.inference_weights):
        model = make_model(args.family, **UNET_WIDTHS[args.family])  # the real UNet shape, random weights
        if args.clip == "full":
            clip = _full_clip()
        else:
            clip = make_clip(args.family, comfy_env.clip_tokenizer_dir(install))
        vae = _vae()
    unet_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    image, mask = _photo(args.size)
    with torch.inference_mode(), torch.random.fork_rng():  # as ComfyUI runs nodes
        torch.manual_seed(0)
        (latent,) = comfy_nodes.VAEEncode().encode(vae, image)
        (positive,) = comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)

    if args.which == "ours":
        node_class = IDFuseTrainIdentity
        kwargs = dict(_defaults(IDFuseTrainIdentity), model=model, clip=clip, vae=vae, images=image, masks=mask,
                      options=options)
        kwargs.update(steps=steps, lora_rank=args.rank, seed=0, save_name="bench", resume_from="none")
        if args.optimizer in OPTIMIZER_LEARNING_RATES:
            kwargs["learning_rate"] = OPTIMIZER_LEARNING_RATES[args.optimizer]
    else:
        node_class = TrainLoraNode
        kwargs = dict(_defaults(TrainLoraNode), model=model, latents=latent, positive=positive)
        kwargs.update(batch_size=1, grad_accumulation_steps=1, steps=steps, rank=args.rank, optimizer="AdamW",
                      loss_function="MSE", seed=0, training_dtype="fp32", lora_dtype="fp32", algorithm="LoRA",
                      gradient_checkpointing=args.gradient_checkpointing, existing_lora="[None]")

    memory = PeakMemory(comfy.model_management.get_torch_device())
    stamps: list[float] = []
    cpu_stamps: list[float] = []  # CPU time of all the process's threads: tells a busy machine apart
    phases = {"trainable_params": 0, "optimizer_class": "", "setup_peak": 0.0, "loop_peak": 0.0}
    profilers: list = []

    def on_step(optimizer, _args, _kwargs) -> None:
        stamps.append(time.perf_counter())
        cpu_stamps.append(time.process_time())
        if len(stamps) == 1:
            phases["trainable_params"] = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
            # what really ran: tells a trainer that ignores the optimizer setting apart
            phases["optimizer_class"] = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
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
            outputs = _call(node_class, kwargs)
    except TrainingError as error:
        if args.optimizer == "AdamW":
            raise
        return {**base, "unavailable": str(error)}  # refused by the trainer rather than the options
    finally:
        hook.remove()
        shutil.rmtree(out_dir, ignore_errors=True)
    total = time.perf_counter() - started
    if len(stamps) != steps:
        raise SystemExit(f"trainer_step: expected {steps} optimiser steps from {args.which}, saw {len(stamps)}")
    whole_peak = max(phases["setup_peak"], memory.peak())
    intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][args.warmup - 1:]
    # Our report (the node's 6th output) keeps sampling and validation time apart from training time.
    timing = json.loads(outputs[5]).get("timing") if args.which == "ours" else None
    return {
        **base,
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
        "after_loop_s": started + total - stamps[-1],  # our sample round, evaluation and files; core's clean-up
        "trainable_params": phases["trainable_params"],
        "optimizer_class": phases["optimizer_class"],
        "timing": timing,
        "unet_params": unet_params,
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


@dataclass(frozen=True)
class Variant:
    """One kind of run, repeated: a trainer with an optimiser, with or without a sample round."""

    name: str
    which: str
    optimizer: str = "AdamW"
    sample_prompts: int = 0


def _variants(args) -> list[Variant]:
    variants = [Variant("ours", "ours"), Variant("core", "core")]
    variants += [Variant(f"ours {name}", "ours", optimizer=name) for name in args.optimizers if name != "AdamW"]
    if args.sample_prompts:
        variants.append(Variant("ours samples", "ours", sample_prompts=args.sample_prompts))
    return variants


def _mem_available_mb() -> float:
    with open("/proc/meminfo", encoding="ascii") as f:
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.MULTILINE).group(1)) / 1024


def _estimated_need_mb(which: str, args) -> float:
    unet_mb = UNET_PARAMS[args.family] * 4 / 2 ** 20
    return unet_mb * (1 + PEAK_SHARE_OF_UNET[which, args.gradient_checkpointing]) + PROCESS_OVERHEAD_MB


def _wait_for_memory(which: str, args) -> str | None:
    """None once the run's estimated need fits in MemAvailable; else, after --memory-wait seconds, why not."""
    need = _estimated_need_mb(which, args)
    deadline = time.monotonic() + args.memory_wait
    while (available := _mem_available_mb()) < need:
        if time.monotonic() >= deadline:
            return f"needs about {need:.0f} MB, MemAvailable {available:.0f} MB (waited {args.memory_wait} s)"
        time.sleep(min(30.0, max(1.0, deadline - time.monotonic())))
    return None


def run_worker(variant: Variant, args) -> dict:
    """One run in a fresh process; a run that does not fit or is killed comes back as {"skipped": why}."""
    base = {"which": variant.which, "optimizer": variant.optimizer, "sample_prompts": variant.sample_prompts}
    short = _wait_for_memory(variant.which, args)
    if short:
        return {**base, "skipped": short}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--which", variant.which, "--family", args.family,
           "--warmup", str(args.warmup), "--timed", str(args.timed), "--size", str(args.size), "--rank",
           str(args.rank), "--attention-mode", args.attention_mode, "--clip", args.clip, "--optimizers",
           variant.optimizer, "--sample-prompts", str(variant.sample_prompts), "--sample-steps",
           str(args.sample_steps), "--sample-size", str(args.sample_size)]
    profiled = args.profile == variant.which and variant.name in TRAINERS  # the plain AdamW runs only
    cmd += ["--profile", args.profile if profiled else "none"]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if args.inference_weights:
        cmd.append("--inference-weights")
    available = _mem_available_mb()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if profiled:
        sys.stderr.write(result.stderr)
    lines = result.stdout.strip().splitlines()
    if result.returncode == -signal.SIGKILL:  # the kernel's out-of-memory killer, as a rule
        sys.stderr.write(result.stderr[-2000:])
        return {**base, "skipped": f"killed (SIGKILL: out of memory?) with MemAvailable {available:.0f} MB at the "
                                   f"start, estimated need {_estimated_need_mb(variant.which, args):.0f} MB"}
    if result.returncode != 0 or not lines:
        sys.stderr.write(result.stderr[-8000:])
        raise SystemExit(f"trainer_step: the {variant.name} run failed (exit {result.returncode})")
    return json.loads(lines[-1])


def _describe(variant: Variant, i: int, run: dict) -> str:
    head = f"repeat {i + 1} {variant.name}"
    if "step_s" not in run:
        return f"{head}: {run.get('unavailable') or run.get('skipped')}"
    line = (f"{head}: {run['step_s']:.3f} s/step (steps {run['step_times_s']}, CPU use {run['cpu_util']:.2f}), peak "
            f"+{run['peak_mb']:.0f} MB (timed steps +{run['loop_peak_mb']:.0f} MB), set-up + warm-up "
            f"{run['first_steps_s']:.1f} s, after {run['after_loop_s']:.1f} s, {run['trainable_params']:,} "
            f"trainable parameters, {run['optimizer_class']}")
    if run.get("timing"):
        line += f", timing {run['timing']}"
    return line


def _completed(runs: list[dict]) -> list[dict]:
    return [r for r in runs if "step_s" in r]


def _median(runs: list[dict], key: str) -> float | None:
    done = _completed(runs)
    return statistics.median(r[key] for r in done) if done else None


def _best(runs: list[dict]) -> float | None:
    done = _completed(runs)
    return min(r["step_s"] for r in done) if done else None


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a / b, 4)


def _why_not(runs: list[dict]) -> str | None:
    """Why a variant has no completed run (its first reason), else None."""
    if _completed(runs):
        return None
    return next((r.get("unavailable") or r.get("skipped") for r in runs), "not run")


def _optimizer_rows(args, runs: dict[Variant, list[dict]]) -> dict:
    adamw = next(r for v, r in runs.items() if v.name == "ours")
    rows = {}
    for name in args.optimizers:
        group = next(r for v, r in runs.items() if v.which == "ours" and v.optimizer == name and not v.sample_prompts)
        if why := _why_not(group):
            rows[name] = {"unavailable" if any("unavailable" in r for r in group) else "skipped": why}
            continue
        step = _median(group, "step_s")
        rows[name] = {"step_s": _rounded(step, 4), "best_step_s": _rounded(_best(group), 4),
                      "step_ratio_to_adamw": _ratio(step, _median(adamw, "step_s")),
                      "peak_mb": _rounded(_median(group, "peak_mb"), 1),
                      "learning_rate": OPTIMIZER_LEARNING_RATES.get(name, "default"),
                      "optimizer_class": _completed(group)[0]["optimizer_class"]}
    return rows


def _sample_round(args, runs: dict[Variant, list[dict]]) -> dict | None:
    """Seconds per sample round and per image, from the reports' timing; the extra time after the last
    step against the plain run (same steps, no samples) as a cross-check."""
    group = next((r for v, r in runs.items() if v.sample_prompts), None)
    if group is None:
        return None
    settings = {"prompts": args.sample_prompts, "sample_steps": args.sample_steps, "sample_size": args.sample_size}
    if why := _why_not(group):
        return {**settings, "not_run": why}
    plain_after = _median(next(r for v, r in runs.items() if v.name == "ours"), "after_loop_s")
    extra = None if plain_after is None else _median(group, "after_loop_s") - plain_after
    row = {**settings, "runs": len(_completed(group)), "after_last_step_extra_s": _rounded(extra, 2),
           "step_s": _rounded(_median(group, "step_s"), 4), "peak_mb": _rounded(_median(group, "peak_mb"), 1)}
    timings = [r["timing"] for r in _completed(group) if r.get("timing")]
    if not timings:
        return {**row, "pending": "the training report has no 'timing' (no sample rounds in this checkout)"}
    rounds = [t["sample_rounds"] for t in timings]
    if not any(rounds):
        return {**row, "sample_rounds": rounds, "pending": "the reports count no sample round"}
    per_round = statistics.median(t["sampling_seconds"] / t["sample_rounds"] for t in timings if t["sample_rounds"])
    return {**row, "sample_rounds": rounds, "seconds_per_round": round(per_round, 2),
            "seconds_per_image": round(per_round / args.sample_prompts, 2),
            "training_seconds": round(statistics.median(t["training_seconds"] for t in timings), 2),
            "validation_seconds": round(statistics.median(t["validation_seconds"] for t in timings), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd15", choices=FAMILIES, help="the UNet's layout (real size)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing (>= 1)")
    parser.add_argument("--timed", type=int, default=4, help="steps timed after the warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each trainer (alternating)")
    parser.add_argument("--size", type=int, default=256, help="photo size in pixels (latent = size / 8)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--attention-mode", default="face_mask", choices=("face_mask", "reference_prompt", "both"))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
                        help="our optimisers to time (comma-separated; AdamW is always run, against core)")
    parser.add_argument("--sample-prompts", type=int, default=2, choices=range(len(SAMPLE_PROMPTS) + 1),
                        help="prompts of the sample-round run (0: no such run)")
    parser.add_argument("--sample-steps", type=int, default=DEFAULTS.sample_steps)
    parser.add_argument("--sample-size", type=int, default=DEFAULTS.sample_size)
    parser.add_argument("--sample-repeats", type=int, default=1, help="repeats that include the sample-round run")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on for both trainers (core's "
                        "default is on, ours off; off for both unless given)")
    parser.add_argument("--clip", default="narrow", choices=("narrow", "full"), help="our trainer's text encoder: "
                        "the tests' narrow CLIP-L (real tokenizer and widths, 3 small layers) or the real-size one "
                        "(SD1.5 only)")
    parser.add_argument("--inference-weights", action="store_true", help="create the weights under "
                        "torch.inference_mode, as ComfyUI's checkpoint loaders do")
    parser.add_argument("--profile", default="none", choices=("none", *TRAINERS),
                        help="profile that trainer's timed steps (cProfile + torch.profiler, to stderr)")
    parser.add_argument("--memory-wait", type=int, default=600, help="seconds to wait for enough free memory "
                        "before a run; then it is skipped")
    parser.add_argument("--which", choices=TRAINERS, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.warmup < 1 or args.timed < 1:
        parser.error("--warmup and --timed must be at least 1")
    if unknown := [name for name in args.optimizers if name not in OPTIMIZERS]:
        parser.error(f"--optimizers: {', '.join(unknown)} not among {', '.join(OPTIMIZERS)}")
    if args.clip == "full" and args.family != "sd15":
        parser.error("--clip full is SD1.5's CLIP-L only")

    install = comfy_env.find_comfy()
    if not install.is_full or not (install.root / "comfy_extras" / "nodes_train.py").is_file():
        print(f"trainer_step: needs a full ComfyUI with comfy_extras/nodes_train.py (TrainLoraNode); found "
              f"{install.kind} ComfyUI at {install.root}. Set COMFYUI_PATH to a ComfyUI checkout.", file=sys.stderr)
        sys.exit(2)
    if args.which:
        args.optimizer = args.optimizers[0]  # a worker runs one
        print(json.dumps(worker(args)))
        return
    if "AdamW" not in args.optimizers:
        args.optimizers.insert(0, "AdamW")

    variants = _variants(args)
    runs: dict[Variant, list[dict]] = {v: [] for v in variants}
    mem_at_start = _mem_available_mb()
    for i in range(args.repeats):
        for variant in variants:
            if variant.sample_prompts and i >= args.sample_repeats:
                continue
            if i and any("unavailable" in r for r in runs[variant]):
                continue  # it will not become available
            run = run_worker(variant, args)
            runs[variant].append(run)
            print(_describe(variant, i, run), flush=True)

    ours, core = runs[variants[0]], runs[variants[1]]
    every_run = [(v, i, r) for v, group in runs.items() for i, r in enumerate(group)]
    busy = [f"{v.name} {i + 1}" for v, i, r in every_run if "step_s" in r and r["cpu_util"] < BUSY_CPU_UTIL]
    if busy:
        print(f"trainer_step: WARNING: the machine was busy during run(s) {', '.join(busy)} (CPU use below "
              f"{BUSY_CPU_UTIL}); their times are inflated. Compare best_ratio, or run again.", file=sys.stderr)
    skipped = {f"{v.name} {i + 1}": r["skipped"] for v, i, r in every_run if "skipped" in r}
    ours_step, core_step = _median(ours, "step_s"), _median(core, "step_s")
    ours_peak, core_peak = _median(ours, "peak_mb"), _median(core, "peak_mb")
    first = (_completed(ours) or _completed(core) or [{}])[0]
    core_first = (_completed(core) or [{}])[0]
    print(json.dumps({
        "ours_step_s": _rounded(ours_step, 4), "core_step_s": _rounded(core_step, 4),
        "ratio": _ratio(ours_step, core_step),
        "ours_best_step_s": _rounded(_best(ours), 4), "core_best_step_s": _rounded(_best(core), 4),
        "best_ratio": _ratio(_best(ours), _best(core)),  # fastest run of each: robust to bursts of load
        "ours_cpu_util": _rounded(_median(ours, "cpu_util"), 3), "core_cpu_util": _rounded(_median(core, "cpu_util"), 3),
        "busy_runs": busy,
        "ours_peak_mb": _rounded(ours_peak, 1), "core_peak_mb": _rounded(core_peak, 1),
        "memory_ratio": _ratio(ours_peak, core_peak),
        "ours_loop_peak_mb": _rounded(_median(ours, "loop_peak_mb"), 1),
        "core_loop_peak_mb": _rounded(_median(core, "loop_peak_mb"), 1),
        "ours_trainable_params": first.get("trainable_params"),
        "core_trainable_params": core_first.get("trainable_params"),
        "optimizers": _optimizer_rows(args, runs),
        "sample_round": _sample_round(args, runs),
        "skipped": skipped,
        "family": args.family, "unet_params": first.get("unet_params"),
        "baseline_mb": _rounded(_median(ours, "baseline_mb"), 1),
        "mem_available_mb_at_start": round(mem_at_start),
        "warmup_steps": args.warmup, "timed_steps": args.timed, "repeats": args.repeats,
        "resolution": args.size, "latent": args.size // 8, "batch": 1, "rank": args.rank,
        "attention_mode": args.attention_mode, "gradient_checkpointing": args.gradient_checkpointing,
        "clip": args.clip, "inference_weights": args.inference_weights,
        "dtype": "float32", "device": first.get("device"), "torch": first.get("torch"),
        "torch_threads": first.get("torch_threads"), "comfyui": str(install.root),
    }))


if __name__ == "__main__":
    main()
