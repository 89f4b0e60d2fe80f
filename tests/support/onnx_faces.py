"""Tiny synthetic ONNX face models that insightface loads and runs with its own classes.

insightface's model router (``insightface/model_zoo/model_zoo.py``) decides what a file is by
its signature alone: 5 or more outputs -> ``SCRFD`` detector; one square input of 112 (or more,
a multiple of 16) -> ``ArcFaceONNX`` recogniser. The two builders here produce exactly those
signatures, small enough to build in milliseconds, so the tests run insightface's real code
(FaceAnalysis, SCRFD decoding + NMS, ArcFaceONNX, face_align) end to end.

Detector (SCRFD layout, ``use_kps``): input ``1x3xHxW`` (dynamic, or fixed), nine outputs
``score_8, score_16, score_32, bbox_8, bbox_16, bbox_32, kps_8, kps_16, kps_32`` of shapes
``(H/s * W/s * 2, 1 | 4 | 10)``: strides 8/16/32 with two anchors per location, rows ordered
(y, x, anchor) as insightface decodes them.

How it "sees" a face: it is a **correlation-filter detector of known faces**. It holds the
ArcFace-aligned 112x112 crops of two real faces (the astronaut of scikit-image, aligned from
hand-labelled landmarks, and insightface's own aligned Tom Hanks sample) as luminance templates,
and scores every anchor box by the normalised cross-correlation (NCC) of the image's luminance
with a template, inside an ellipse over the inner face (brows to chin, so hair and background
do not count):

- anchor box side L per (stride, anchor): (64, 88), (128, 176), (256, 352) pixels, centred on the
  anchor point. The luminance is average-pooled into cells of stride/2 pixels, so a template has
  16 or 22 cells a side, and ONE strided ``Conv`` over (cells, cells^2) gives per window the
  correlation with each template and the masked mean and mean square;
- NCC = correlation / sqrt(masked variance + eps): a flat or nearly flat patch (sky, a wall) has
  no variance and scores about 0;
- score = sigmoid(24 * (max NCC over the templates - 0.75)), so a box passes insightface's 0.5
  threshold only where a template face is, at about the box's size (within ~10 %: the anchors
  are ~1.4x apart, so a face may be found at some detection sizes and not at others, which is
  what the fallback test relies on).

Measured with the shipped photos: the faces reach NCC 0.80 to 1.00 at their best detection size;
the best non-face windows of scikit-image's astronaut, coffee, chelsea (a cat), camera and rocket
sky and of insightface's group photo t1.jpg stay at or below 0.70.

Boxes and keypoints are geometric constants of the anchor: the box is the L x L square, the five
keypoints are insightface's ArcFace destination points scaled into it. So aligning a detection
with ``face_align.norm_crop`` gives back (close to) the template's crop. Works on colour and grey
images alike (luminance only). It is not a general face detector: faces of other people are
found only where they happen to correlate with a template.

Recogniser (ArcFace layout): input ``1x3x112x112`` -> ``1x512``: luminance, 8x8 average pooling
(14x14 cells), minus the crop's mean, times a fixed random 196x512 matrix. So the embedding is a
function of the aligned crop: two photos of the same face give close embeddings, different faces
distinct ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

OPSET = 17
IR_VERSION = 8  # what onnxruntime >= 1.14 reads; keeps the files loadable by older runtimes too

# insightface.utils.face_align.arcface_dst: where ArcFace alignment puts the five keypoints
# (left eye, right eye, nose tip, left and right mouth corner) in a 112x112 crop.
ARCFACE_KPS_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                            [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)

# Hand-labelled five keypoints of the face in skimage.data.astronaut() (512x512).
ASTRONAUT_KPS = np.array([[203.8, 100.8], [247.0, 102.5], [223.8, 126.3], [204.5, 141.3], [243.0, 141.3]],
                         dtype=np.float32)

STRIDES = (8, 16, 32)
TEMPLATE_CELLS = (16, 22)  # cells per template side for the two anchors of a stride
DETECTION_THRESHOLD = 0.75  # NCC at which the score crosses 0.5
SCORE_SLOPE = 24.0
VARIANCE_EPS = 1e-3  # in (normalised luminance)^2: flat patches stay far below a face's variance
FACE_MASK_RADII = (40.0, 46.0)  # ellipse half-axes, in 112-crop pixels, centred at (56, 70)

# Real pack file names: FaceAnalysis loads every *.onnx in the folder and routes by signature.
PACK_FILES = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
}


def anchor_sides(stride: int) -> tuple[int, int]:
    cell = stride // 2
    return tuple(k * cell for k in TEMPLATE_CELLS)


# --- sample photos -----------------------------------------------------------------------


def insightface_sample(name: str) -> np.ndarray:
    """An image shipped in insightface/data/images, as RGB uint8."""
    import cv2
    import insightface

    path = os.path.join(os.path.dirname(insightface.__file__), "data", "images", name)
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(path)
    return np.ascontiguousarray(bgr[:, :, ::-1])


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def tom_hanks() -> np.ndarray:
    """insightface's sample face: already an ArcFace-aligned 112x112 crop (a grey photo)."""
    return insightface_sample("Tom_Hanks_54745.png")


def sky() -> np.ndarray:
    """Clear evening sky from skimage's rocket photo (between the launch towers): a real photo without a face."""
    from skimage import data

    return np.ascontiguousarray(data.rocket()[:120, 100:180])


def aligned_crop(rgb: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """insightface's ArcFace alignment of the five keypoints (RGB in, RGB out)."""
    import warnings

    from insightface.utils import face_align

    with warnings.catch_warnings():  # scikit-image >= 0.26 deprecates the estimate() face_align calls
        warnings.filterwarnings("ignore", message=".*estimate.*deprecated", category=FutureWarning)
        return face_align.norm_crop(rgb, landmark=kps, image_size=size)


def sample_templates() -> list[np.ndarray]:
    """The aligned 112x112 RGB crops the detector correlates with."""
    return [aligned_crop(astronaut(), ASTRONAUT_KPS), tom_hanks()]


# --- graph helpers -----------------------------------------------------------------------


class _Graph:
    def __init__(self, prefix: str):
        self.nodes: list = []
        self.initializers: list = []
        self.prefix = prefix
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}_{hint}_{self.count}"

    def const(self, value, hint: str = "const") -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        from onnx import helper

        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def op_multi(self, op_type: str, inputs: list[str], count: int, hint: str, **attrs) -> list[str]:
        from onnx import helper

        outs = [self.name(hint) for _ in range(count)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=outs[0], **attrs))
        return outs

    def output(self, value: str, name: str) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node("Identity", [value], [name], name=self.name("out")))


def _luminance(g: _Graph, image: str) -> str:
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(1, 3, 1, 1)
    return g.op("Conv", [image, g.const(weights, "luma_w")], "luma")


def _face_mask(cells: int) -> np.ndarray:
    """Ellipse over the inner face of an aligned crop (brows to chin), as cell weights summing to 1."""
    centre = np.array([56.0, 70.0]) / 112.0 * cells
    radii = np.array(FACE_MASK_RADII) / 112.0 * cells
    ys, xs = np.mgrid[:cells, :cells] + 0.5
    inside = ((xs - centre[0]) / radii[0]) ** 2 + ((ys - centre[1]) / radii[1]) ** 2 <= 1.0
    return (inside / inside.sum()).astype(np.float32)


def _template_weights(templates: list[np.ndarray], cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Correlation weights (T,1,k,k) such that corr / local masked std = masked NCC, and the mask (1,1,k,k)."""
    import cv2

    mask = _face_mask(cells)
    out = []
    for rgb in templates:
        luma = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY).astype(np.float32)
        small = cv2.resize((luma - 127.5) / 128.0, (cells, cells), interpolation=cv2.INTER_AREA)
        mean = (small * mask).sum()
        std = np.sqrt((((small - mean) ** 2) * mask).sum())
        out.append((small - mean) * mask / std)
    return np.stack(out)[:, None].astype(np.float32), mask[None, None]


def _anchor_score(g: _Graph, cells_and_squares: str, cells: int, templates: list[np.ndarray]) -> str:
    """[1,1,H/s,W/s] score of the anchor box whose templates have ``cells`` cells a side.

    One Conv over the two input channels (cells, cells^2) gives, per window, the correlation with
    each template and the masked mean of the cells and of their squares.
    """
    weights, mask = _template_weights(templates, cells)
    count = len(templates)
    kernel = np.zeros((count + 2, 2, cells, cells), dtype=np.float32)
    kernel[:count, 0] = weights[:, 0]
    kernel[count, 0] = mask[0, 0]
    kernel[count + 1, 1] = mask[0, 0]
    k = cells
    # The window of output j covers cells [2j - k/2, 2j + k/2): centred on anchor point j*stride.
    window = g.op("Conv", [cells_and_squares, g.const(kernel, "kernel")], "window", strides=[2, 2],
                  pads=[k // 2, k // 2, k // 2 - 1, k // 2 - 1])
    corr, mean, mean_square = g.op_multi("Split", [window, g.const(np.array([count, 1, 1], dtype=np.int64), "split")],
                                         3, "parts", axis=1)
    variance = g.op("Relu", [g.op("Sub", [mean_square, g.op("Mul", [mean, mean])])], "var")
    std = g.op("Sqrt", [g.op("Add", [variance, g.const(np.float32(VARIANCE_EPS), "eps")])], "std")
    ncc = g.op("ReduceMax", [g.op("Div", [corr, std], "ncc")], "best", axes=[1], keepdims=1)
    logit = g.op("Mul", [g.op("Sub", [ncc, g.const(np.float32(DETECTION_THRESHOLD), "theta")]),
                         g.const(np.float32(SCORE_SLOPE), "slope")])
    return g.op("Sigmoid", [logit], "score")


def _per_anchor_rows(g: _Graph, nchw: str, width: int) -> str:
    """[1, 2*width, h, w] -> [h*w*2, width]: insightface's (y, x, anchor) row order."""
    nhwc = g.op("Transpose", [nchw], "nhwc", perm=[0, 2, 3, 1])
    return g.op("Reshape", [nhwc, g.const(np.array([-1, width], dtype=np.int64), "shape")], "rows")


def build_detector(templates: list[np.ndarray] | None = None, input_size: int | None = None):
    """An SCRFD-style detector (9 outputs, keypoints) as an onnx.ModelProto; see the module doc."""
    from onnx import TensorProto, helper

    templates = sample_templates() if templates is None else templates
    g = _Graph("det")
    side = input_size if input_size else None
    image_shape = [1, 3, side or "height", side or "width"]
    luma = _luminance(g, "input.1")
    scores, boxes, keypoints = [], [], []
    for stride in STRIDES:
        cell = stride // 2
        cells_map = g.op("AveragePool", [luma], f"cells{stride}", kernel_shape=[cell, cell], strides=[cell, cell])
        both = g.op("Concat", [cells_map, g.op("Mul", [cells_map, cells_map], "squares")], "both", axis=1)
        anchor_scores = [_anchor_score(g, both, k, templates) for k in TEMPLATE_CELLS]
        pair = g.op("Concat", anchor_scores, "pair", axis=1)
        scores.append(_per_anchor_rows(g, pair, 1))
        # Box and keypoints are constants of the anchor, in units of the stride (insightface
        # multiplies them by the stride): broadcast them over the grid of this stride.
        zero_grid = g.op("Mul", [anchor_scores[0], g.const(np.float32(0.0), "zero")], "grid")
        box_dist, kps_offset = [], []
        for box_side in anchor_sides(stride):
            box_dist.append(np.full(4, box_side / 2 / stride, dtype=np.float32))
            kps_offset.append(((ARCFACE_KPS_112 / 112.0 - 0.5) * box_side / stride).reshape(-1))
        box_const = np.concatenate(box_dist).reshape(1, 8, 1, 1).astype(np.float32)
        kps_const = np.concatenate(kps_offset).reshape(1, 20, 1, 1).astype(np.float32)
        boxes.append(_per_anchor_rows(g, g.op("Add", [zero_grid, g.const(box_const, "box")]), 4))
        keypoints.append(_per_anchor_rows(g, g.op("Add", [zero_grid, g.const(kps_const, "kps")]), 10))

    outputs = []
    for kind, values, width in (("score", scores, 1), ("bbox", boxes, 4), ("kps", keypoints, 10)):
        for stride, value in zip(STRIDES, values, strict=True):
            name = f"{kind}_{stride}"
            g.output(value, name)
            rows = (side // stride) ** 2 * 2 if side else f"rows_{stride}"
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [rows, width]))
    graph = helper.make_graph(g.nodes, "synthetic_scrfd",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, image_shape)],
                              outputs, g.initializers)
    return _model(graph)


def build_recognizer(seed: int = 0):
    """An ArcFace-style recogniser 1x3x112x112 -> 1x512 as an onnx.ModelProto; see the module doc."""
    from onnx import TensorProto, helper

    g = _Graph("rec")
    luma = _luminance(g, "data")
    cells = g.op("AveragePool", [luma], "pool", kernel_shape=[8, 8], strides=[8, 8])
    flat = g.op("Flatten", [cells], "flatten", axis=1)
    centred = g.op("Sub", [flat, g.op("ReduceMean", [flat], "crop_mean", axes=[1], keepdims=1)], "centred")
    projection = np.random.default_rng(seed).standard_normal((14 * 14, 512)).astype(np.float32) / 14.0
    g.output(g.op("MatMul", [centred, g.const(projection, "projection")], "project"), "fc1")
    graph = helper.make_graph(g.nodes, "synthetic_arcface",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 512])],
                              g.initializers)
    return _model(graph)


def _model(graph):
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="idfuse-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def write_model_pack(insightface_root: Path, pack: str = "buffalo_l", nested: bool = False,
                     detector_input_size: int | None = None) -> Path:
    """Write a pack's detector + recogniser as insightface lays them out under root/models/<pack>.

    ``nested`` reproduces an archive unpacked into its own folder: models/<pack>/<pack>/*.onnx.
    """
    import onnx

    folder = Path(insightface_root) / "models" / pack
    if nested:
        folder = folder / pack
    folder.mkdir(parents=True, exist_ok=True)
    detector_name, recognizer_name = PACK_FILES[pack]
    onnx.save(_cached_detector(detector_input_size), str(folder / detector_name))
    onnx.save(_cached_recognizer(), str(folder / recognizer_name))
    return folder


_CACHE: dict = {}


def _cached_detector(input_size: int | None):
    key = ("det", input_size)
    if key not in _CACHE:
        _CACHE[key] = build_detector(input_size=input_size)
    return _CACHE[key]


def _cached_recognizer():
    if "rec" not in _CACHE:
        _CACHE["rec"] = build_recognizer()
    return _CACHE["rec"]
