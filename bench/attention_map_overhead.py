"""Cost of IDFuse Attention Map: the same sampling with and without the node, in the same run.

Random-weight UNet of the real SD1.5 layout (full width), 512x512 (the size whose mid-resolution layers are
the 16x16 grid), CFG with a negative prompt, euler; two words mapped; the node's default layers
(mid-resolution) and window (30%-70% of the sampling) unless given. Runs interleaved, median of each. The last
line printed is a JSON object: off_s, on_s, ratio (on / off), recorded_steps, layers, steps, size, repeats.

    python bench/attention_map_overhead.py [--steps 10] [--repeats 3] [--size 512] [--layers all]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

import comfy_env  # noqa: E402
from timing import interleaved_medians  # noqa: E402

TEXT = "a photo of sks person and zwx person in a garden"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--layers", default=None, help="a layers choice of the node (default: its default)")
    parser.add_argument("--start-percent", type=float, default=None)
    parser.add_argument("--end-percent", type=float, default=None)
    args = parser.parse_args()

    install = comfy_env.setup_comfy()
    import comfy.sample
    import torch
    from factories import make_clip, make_model

    from comfyui_idfuse.models.attention_maps.layers import DEFAULT_LAYER_SET
    from comfyui_idfuse.nodes.attention_map import DEFAULT_END_PERCENT, DEFAULT_START_PERCENT, IDFuseAttentionMap

    layers = args.layers or DEFAULT_LAYER_SET
    start = DEFAULT_START_PERCENT if args.start_percent is None else args.start_percent
    end = DEFAULT_END_PERCENT if args.end_percent is None else args.end_percent
    model = make_model("sd15", model_channels=320)
    clip = make_clip("sd15", comfy_env.clip_tokenizer_dir(install))
    patched, record = IDFuseAttentionMap().record(model, clip, TEXT, "sks, zwx", layers, start, end)

    gen = torch.Generator().manual_seed(0)
    positive, negative = [[torch.randn(1, 77, 768, generator=gen), {}]], [[torch.randn(1, 77, 768, generator=gen), {}]]
    noise = torch.randn(1, 4, args.size // 8, args.size // 8, generator=gen)

    def timed(which) -> float:
        start_time = time.perf_counter()
        with torch.inference_mode():
            comfy.sample.sample(which, noise, args.steps, 7.0, "euler", "normal", positive, negative,
                                torch.zeros_like(noise), disable_pbar=True, seed=0)
        return time.perf_counter() - start_time

    runs = {"off": lambda: timed(model), "on": lambda: timed(patched)}
    med = interleaved_medians(runs, args.repeats)
    print(json.dumps({"off_s": round(med["off"], 4), "on_s": round(med["on"], 4),
                      "ratio": round(med["on"] / med["off"], 4), "recorded_steps": record.steps,
                      "layers": f"{layers} ({len(record.layers)})", "window": [start, end], "steps": args.steps,
                      "size": args.size, "repeats": args.repeats, "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
