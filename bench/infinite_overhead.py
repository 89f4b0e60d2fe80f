"""Cost of Infinite-ID sampling: plain, ID cross-attention only, two streams, and regional two streams with two
identities (left and right half), in the same run.

Random-weight UNet of the real SD1.5 layout (full width), 256x256, CFG with a negative prompt,
a few euler steps; runs interleaved, median of each. ID keys/values are random (4 tokens per
layer, as IP-Adapter FaceID); the cost does not depend on their values. The last line printed is
a JSON object: plain_s, id_attention_s, two_stream_s, regional_two_s, id_attention_ratio, ratio (two-stream /
plain), regional_ratio (two identities in their regions / one identity everywhere, both two-stream).
``--runs`` picks some of plain, id_attention, two_stream, regional_two (ratios need both of their runs).

    python bench/infinite_overhead.py [--steps 3] [--repeats 3] [--runs two_stream regional_two]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", nargs="+", default=["plain", "id_attention", "two_stream", "regional_two"])
    args = parser.parse_args()

    comfy_env.setup_comfy()
    import comfy.samplers
    import torch
    from comfy.ldm.modules.attention import optimized_attention
    from factories import make_model, random_id_layers

    from comfyui_idfuse.models.infinite_id.attention import IDCrossAttention, RegionMasks
    from comfyui_idfuse.models.infinite_id.settings import InfiniteIDSettings
    from comfyui_idfuse.models.unet import block_keys
    from comfyui_idfuse.nodes.glue.infinite_id import TwoStreamGuider, two_stream_model

    model = make_model("sd15", model_channels=320)
    layers = random_id_layers(model, "sd15")
    one_stream = model.clone()
    cross = IDCrossAttention(optimized_attention, layers, 1.0, two_streams=False)
    for key in block_keys("sd15"):
        one_stream.set_model_attn2_replace(cross, *key.key)
    settings = InfiniteIDSettings(id_weight=1.0, mixing=True, mix_blocks="all")
    two = two_stream_model(model, layers, settings)
    halves = torch.zeros(2, args.size, args.size)
    halves[0, :, : args.size // 2], halves[1, :, args.size // 2:] = 1.0, 1.0
    regional = two_stream_model(model, [layers, random_id_layers(model, "sd15", seed=1)], settings,
                                RegionMasks(halves))

    gen = torch.Generator().manual_seed(0)
    positive, negative = [[torch.randn(1, 77, 768, generator=gen), {}]], [[torch.randn(1, 77, 768, generator=gen), {}]]
    latent = args.size // 8
    noise = torch.randn(1, 4, latent, latent, generator=gen)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", args.steps)

    def timed(guider) -> float:
        guider.set_conds(positive, negative)
        guider.set_cfg(7.0)
        start = time.perf_counter()
        with torch.inference_mode():
            guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas,
                          disable_pbar=True, seed=0)
        return time.perf_counter() - start

    runs = {"plain": lambda: timed(comfy.samplers.CFGGuider(model)),
            "id_attention": lambda: timed(comfy.samplers.CFGGuider(one_stream)),
            "two_stream": lambda: timed(TwoStreamGuider(two)),
            "regional_two": lambda: timed(TwoStreamGuider(regional))}
    runs = {name: run for name, run in runs.items() if name in args.runs}
    med = interleaved_medians(runs, args.repeats)

    def ratio(numerator: str, denominator: str) -> float | None:
        return round(med[numerator] / med[denominator], 4) if numerator in med and denominator in med else None

    print(json.dumps({**{f"{name}_s": round(t, 4) for name, t in med.items()},
                      "id_attention_ratio": ratio("id_attention", "plain"), "ratio": ratio("two_stream", "plain"),
                      "regional_ratio": ratio("regional_two", "two_stream"), "steps": args.steps, "size": args.size,
                      "repeats": args.repeats, "torch_threads": torch.get_num_threads()}))

if __name__ == "__main__":
    main()
