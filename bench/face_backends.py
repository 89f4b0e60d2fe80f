"""Per-photo face detection and embedding time of each face backend on the same photos, in one run, and
which faces each found.

Backends: dlib HOG and dlib CNN (the public-domain models of requirements.txt, always real), insightface
packs when ``--insightface-root`` points at a folder with real ones (``<root>/models/buffalo_l/...``, as
ComfyUI's models/insightface). (Its first run also timed scikit-image's cascade, then the face-mask
detector; the README keeps those figures: dlib HOG found every face it found, so it was removed.) Without real insightface packs insightface is skipped: the tests' tiny
random ONNX models would time nothing meaningful.

Photos (all ship in installed packages): scikit-image's astronaut and its mirror image, its cameraman
(a face turned to the camera's viewfinder), insightface's aligned Tom Hanks crop (112 px, the face fills
it) and its group photo t1.jpg (six people); faceless: scikit-image's coffee, chelsea (a cat), rocket,
and insightface's mask_blue.jpg (a surgical mask on its own).

Each photo is detected ``--repeats`` times (median kept) after one warm-up, then every face found is
embedded (median of the per-face time over the repeats). Times are on this machine's CPU.

The table shows process CPU seconds (all threads), which other jobs on a shared machine disturb less than
wall-clock time. The last line printed is a JSON object: per backend, load_s, and per photo detect_s and
detect_cpu_s, embed_s_per_face and embed_cpu_s_per_face (wall clock and CPU), faces, boxes (x1, y1, x2, y2,
rounded) and scores.

    python bench/face_backends.py [--repeats 3] [--det-size 640] [--insightface-root PATH] [--skip-cnn]
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


def photos() -> dict[str, object]:
    import numpy as np
    from skimage import data

    def rgb(image):
        return np.ascontiguousarray(image if image.ndim == 3 else np.stack([image] * 3, axis=-1))

    found = {"astronaut": rgb(data.astronaut()), "astronaut_mirrored": rgb(data.astronaut()[:, ::-1]),
             "cameraman": rgb(data.camera())}
    try:
        import onnx_faces

        found["tom_hanks_112"] = onnx_faces.insightface_sample("Tom_Hanks_54745.png")
        found["group_t1"] = onnx_faces.insightface_sample("t1.jpg")
        faceless_insightface = {"mask_blue (no face)": onnx_faces.insightface_sample("mask_blue.jpg")}
    except ImportError:  # insightface (and cv2) not installed: its photos are not available
        faceless_insightface = {}
    found.update({f"{name} (no face)": rgb(getattr(data, name)()) for name in ("coffee", "chelsea", "rocket")})
    found.update(faceless_insightface)
    return found


def median_time(function, repeats: int) -> tuple[float, float, object]:
    """Median wall-clock and process CPU seconds of function() (CPU time: all threads; less disturbed than wall
    time on a machine other jobs share)."""
    result = function()  # warm-up (first-call allocations)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = function()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), result


def measure(detector, photo_set: dict, repeats: int, embeds: bool) -> dict:
    rows = {}
    for name, rgb in photo_set.items():
        detect_s, detect_cpu_s, faces = median_time(lambda rgb=rgb: detector.detect(rgb), repeats)
        row = {"detect_s": round(detect_s, 4), "detect_cpu_s": round(detect_cpu_s, 4), "faces": len(faces),
               "boxes": [[round(float(v)) for v in box] for box in faces.boxes],
               "scores": [round(float(s), 3) for s in faces.scores]}
        if embeds and len(faces):
            per_face = [median_time(lambda rgb=rgb, face=faces[i]: detector.embed(rgb, face), repeats)[:2]
                        for i in range(len(faces))]
            row["embed_s_per_face"] = round(statistics.median(wall for wall, _ in per_face), 4)
            row["embed_cpu_s_per_face"] = round(statistics.median(cpu for _, cpu in per_face), 4)
        rows[name] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--det-size", type=int, default=640)
    parser.add_argument("--insightface-root", type=Path, default=None,
                        help="folder with real insightface packs: <root>/models/<pack>/*.onnx")
    parser.add_argument("--skip-cnn", action="store_true", help="leave out dlib CNN (seconds per photo on CPU)")
    args = parser.parse_args()

    comfy_env.setup_comfy()
    comfy_env.import_pack()
    from comfyui_idfuse.models.faces.dlib import MODELS, DlibBackend

    photo_set = photos()
    loaders = {name: (lambda name=name: DlibBackend.load(name, [], "CPU", args.det_size)) for name in MODELS
               if not (args.skip_cnn and "CNN" in name)}
    skipped = {}
    if args.insightface_root is not None:
        from comfyui_idfuse.models.faces.insightface import MODEL_PACKS, InsightFaceBackend

        for pack in MODEL_PACKS:
            if (args.insightface_root / "models" / pack).is_dir():
                loaders[f"insightface {pack}"] = (
                    lambda pack=pack: InsightFaceBackend.load(pack, [args.insightface_root], "CPU", args.det_size))
    else:
        skipped["insightface"] = ("no real model packs given (--insightface-root); the tests' tiny random ONNX "
                                  "models would give meaningless timings")

    results: dict[str, dict] = {}
    for label, load in loaders.items():
        start = time.perf_counter()
        detector = load()
        load_s = time.perf_counter() - start
        rows = measure(detector, photo_set, args.repeats, embeds=hasattr(detector, "embed"))
        results[label] = {"load_s": round(load_s, 3), "photos": rows}

    print(f"{'photo (CPU s: detect+embed)':28s}" + "".join(f"{label[:24]:>26s}" for label in results))
    for name in photo_set:
        cells = []
        for label in results:
            row = results[label]["photos"][name]
            embed = f"+{row['embed_cpu_s_per_face']:.2f}/face" if "embed_cpu_s_per_face" in row else ""
            cells.append(f"{row['faces']} faces {row['detect_cpu_s']:.2f}s{embed}")
        print(f"{name:28s}" + "".join(f"{cell:>26s}" for cell in cells))
    print(json.dumps({"det_size": args.det_size, "repeats": args.repeats, "skipped": skipped,
                      "photo_sizes": {name: list(rgb.shape[1::-1]) for name, rgb in photo_set.items()},
                      "backends": results}))


if __name__ == "__main__":
    main()
