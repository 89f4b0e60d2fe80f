"""Overhead of IDFuse Apply ID Tokens on sampling: plain vs patched, and two identities in one prompt vs one,
measured in the same run.

A random-weight UNet of the real SD1.5 layout (full width), 256x256 (32x32 latent), CFG with a
negative prompt, a few euler steps. Runs alternate plain / one identity (5 stages) / two identities (5 and 3
stages: 7 segments); the median of each is kept. The last line printed is a JSON object: baseline_s,
patched_s, ratio (patched / baseline), two_identities_s and two_vs_one (two identities / one).

    python bench/tokens_overhead.py [--steps 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

import comfy_env  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size / 8)")
    args = parser.parse_args()

    comfy_env.setup_comfy()
    import torch
    from factories import make_model, random_stage_contexts, sample

    from comfyui_idfuse.models.tokens.identity_set import segment_stages
    from comfyui_idfuse.models.tokens.patch import StageContexts
    from comfyui_idfuse.nodes.tokens import IDFuseApplyIDTokens

    model = make_model("sd15", model_channels=320)  # the real SD1.5 UNet shape, random weights
    contexts = random_stage_contexts("sd15", num_stages=5)
    positive = [[contexts.plain, {"idfuse_stage_contexts": contexts}]]
    negative = [[torch.randn(1, 77, 768), {}]]
    (patched,) = IDFuseApplyIDTokens().apply(model, positive, 1.0, 0.0, 1.0)
    # Two identities: what Encode With ID makes of a 5-stage and a 3-stage identity (one encoding per segment).
    segments = segment_stages([5, 3])
    joint = random_stage_contexts("sd15", num_stages=len(segments), seed=1)
    pair = StageContexts(family="sd15", placeholder="sks", plain=joint.plain, keys=joint.keys, values=joint.values,
                         placeholders=("sks", "ohwx"), stage_counts=(5, 3), segments=segments)
    pair_positive = [[pair.plain, {"idfuse_stage_contexts": pair}]]
    (pair_patched,) = IDFuseApplyIDTokens().apply(model, pair_positive, 1.0, 0.0, 1.0)

    def timed(m, conditioning=positive) -> float:
        start = time.perf_counter()
        sample(m, conditioning, negative, steps=args.steps, cfg=7.0, size=args.size // 8)
        return time.perf_counter() - start

    timed(model)  # warm-up: first call loads the model and allocates
    timed(patched)
    timed(pair_patched, pair_positive)
    plain_times, patched_times, pair_times = [], [], []
    for i in range(args.repeats):
        plain_times.append(timed(model))
        patched_times.append(timed(patched))
        pair_times.append(timed(pair_patched, pair_positive))
        print(f"repeat {i + 1}: plain {plain_times[-1]:.3f} s, patched {patched_times[-1]:.3f} s, "
              f"two identities {pair_times[-1]:.3f} s", flush=True)
    baseline, with_patch = statistics.median(plain_times), statistics.median(patched_times)
    with_pair = statistics.median(pair_times)
    print(json.dumps({"baseline_s": round(baseline, 4), "patched_s": round(with_patch, 4),
                      "ratio": round(with_patch / baseline, 4), "two_identities_s": round(with_pair, 4),
                      "two_vs_one": round(with_pair / with_patch, 4), "steps": args.steps, "size": args.size,
                      "repeats": args.repeats, "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
