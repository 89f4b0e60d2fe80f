"""Every error IDFuse shows a user: one root, ``IDFuseError``, and a class per capability.

Each message says what is wrong, names the input or file, and says what to do. The built-in
mixins (``ValueError`` for bad input or files, ``RuntimeError`` for what cannot run) keep
``except ValueError`` working for callers that only know Python's own types.
"""

from __future__ import annotations


class IDFuseError(Exception):
    """Root of the pack's user-facing errors."""


class IDFuseInputError(IDFuseError, ValueError):
    """A node input or setting that cannot be used (wrong range, order or combination)."""


class UnsupportedModelError(IDFuseError, ValueError):
    """The model is not one the pack supports (family, sampling type)."""


class ModelLayerNotFound(UnsupportedModelError, LookupError):
    """The UNet lacks a cross-attention layer of the family's block table (an unusual UNet layout)."""


class IDTokensError(IDFuseError, ValueError):
    """A token file or token set that cannot be used."""


class IDEncoderError(IDFuseError, ValueError):
    """An ID-encoder file or input that cannot be used."""


class LoRAFileError(IDFuseError, ValueError):
    """A LoRA file that does not fit the model or the settings."""


class FaceAnalysisError(IDFuseError, RuntimeError):
    """Face detection, alignment or embedding cannot run or gave no usable face."""


class NoFaceError(FaceAnalysisError):
    """A photo in which no face was found."""


class FaceDetectorUnavailable(FaceAnalysisError):
    """A face detector cannot run (its package is missing)."""


class TrainingError(IDFuseError, RuntimeError):
    """Training cannot start or go on."""


class TrainingSettingsError(TrainingError, ValueError):
    """A training setting that cannot be used (unknown mode, a loss without what it needs)."""


class NoFaceInTrainingPhotoError(NoFaceError, TrainingError):
    """A training photo without a face where its face mask is needed (the attention loss, IDFuse Face Masks)."""


class TrainingFaceDetectorUnavailable(FaceDetectorUnavailable, TrainingError):
    """The built-in detector for training masks cannot run (dlib or its models are missing)."""


class NonFiniteLossError(TrainingError):
    def __init__(self, step: int, what: str, values: dict[str, float]):
        self.step = step
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        super().__init__(f"Training step {step}: the {what} is not finite ({shown}). Training stopped; "
                         f"lower the learning rate or λ, or use training_dtype float32.")
