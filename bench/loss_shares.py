"""Each loss term's share of the trained parameters' gradient, per attention_mode, at a given λ.

IDFuse Train Identity on the tests' small random-weight SD1.5 model (tests/support/factories.py: the
real block layout and context width, few channels; the tests' narrow CLIP with the real tokenizer;
the tests' 128x128 photos of a skin-coloured block with its mask), every other setting at its
default unless given. The gradient of every term is measured at every step. The numbers describe
random weights, not a trained SD1.5: they say whether a term can matter at all at that λ, not what
it does with real weights (the training report of a real run states the same numbers).

The last line printed is a JSON object: per mode, the mean over all steps of each term's value
and of its gradient share per parameter group (tokens, and lora when --lora-rank > 0).

    python bench/loss_shares.py [--steps 20] [--attention-weight 0.003] [--modes face_mask reference_prompt both]
                                [--lora-rank 0] [--photos 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

import comfy_env  # noqa: E402


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--attention-weight", type=float, default=None, help="λ (default: the node's default)")
    parser.add_argument("--modes", nargs="+", default=["face_mask", "reference_prompt", "both"])
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--photos", type=int, default=2)
    args = parser.parse_args()

    install = comfy_env.setup_comfy()
    import folder_paths
    import torch
    from factories import make_clip, make_model, tiny_vae
    from trainer_inputs import face_photos, settings

    from comfyui_idfuse.models.training import token_trainer
    from comfyui_idfuse.models.training.report import loss_terms
    from comfyui_idfuse.models.training.settings import DEFAULTS
    from comfyui_idfuse.nodes.glue.folders import ID_TOKENS_FOLDER
    from comfyui_idfuse.nodes.train import IDFuseTrainIdentity

    out_dir = tempfile.mkdtemp(prefix="idfuse-bench-shares-")
    folder_paths.models_dir = out_dir
    folder_paths.folder_names_and_paths[ID_TOKENS_FOLDER] = ([os.path.join(out_dir, "tokens")], {".safetensors"})
    folder_paths.folder_names_and_paths["loras"] = ([os.path.join(out_dir, "loras")], {".safetensors"})
    token_trainer.GRADIENT_SHARE_EVERY = 1  # every step

    tokenizer_dir = comfy_env.clip_tokenizer_dir(install)
    model, clip, vae = make_model("sd15"), make_clip("sd15", tokenizer_dir), tiny_vae()
    images, masks = face_photos(args.photos)
    weight = DEFAULTS.attention_weight if args.attention_weight is None else args.attention_weight
    seen = {}
    original_run = token_trainer.IdentityTrainer.run

    def keep_trainer(self, on_step=lambda _losses: None):
        seen["trainer"] = self
        return original_run(self, on_step)

    token_trainer.IdentityTrainer.run = keep_trainer
    results = {}
    for mode in args.modes:
        # The node's defaults, but for the tests' photo size: no augmentation copies, 128 px.
        kwargs = settings(save_name=f"shares_{mode}", steps=args.steps, attention_mode=mode,
                          attention_weight=weight, lora_rank=args.lora_rank, learning_rate=DEFAULTS.learning_rate,
                          num_stages=DEFAULTS.num_stages, templates="\n".join(DEFAULTS.templates),
                          augmentation=DEFAULTS.augmentation)
        with torch.inference_mode():
            IDFuseTrainIdentity().train(model, clip, vae, images, masks=masks, **kwargs)
        history = seen["trainer"].history.steps
        shares = {}
        for step in history:
            for group, norms in step.gradient_norms.items():
                for name, share in token_trainer.gradient_shares(norms).items():
                    shares.setdefault(group, {}).setdefault(name, []).append(share)
        results[mode] = {
            "values": {"diffusion": _mean([s.diffusion for s in history]),
                       **{n: _mean([s.terms[n] for s in history]) for n in history[0].terms}},
            "gradient_share_mean": {g: {n: _mean(v) for n, v in by.items()} for g, by in shares.items()},
            "gradient_share_min_max": {g: {n: [min(v), max(v)] for n, v in by.items()} for g, by in shares.items()},
            "report": loss_terms(history, seen["trainer"].term_weights())["gradient_share"],
        }
        print(mode, json.dumps(results[mode]["gradient_share_mean"]), flush=True)
    print(json.dumps({"attention_weight": weight, "steps": args.steps, "lora_rank": args.lora_rank,
                      "weights": "random (tests' small SD1.5)", "modes": results}))


if __name__ == "__main__":
    main()
