"""The kinds of ID encoder IDFuse reads, one file each, and the one list the loader asks.

Adding a kind: a file here with an ``EncoderKind`` subclass (``base.py`` says what it answers), and
an instance of it in ``ENCODER_KINDS``. Every kind is asked about every file; exactly one may
recognise it.
"""

from __future__ import annotations

from ...errors import IDEncoderError
from ..checkpoint import Checkpoint
from .base import EncoderKind
from .faceid import FaceID
from .faceid_plus import FaceIDPlus, FaceIDPlusV2
from .idfuse import IDFuse

ENCODER_KINDS: list[EncoderKind] = [
    FaceID(),
    FaceIDPlus(),
    FaceIDPlusV2(),
    IDFuse(),
]


def kind_names() -> dict[str, str]:
    """Each kind's name and display name: {"faceid": "IP-Adapter FaceID", ...}."""
    return {kind.name: kind.display_name for kind in ENCODER_KINDS}


def kind_named(name: str) -> EncoderKind:
    for kind in ENCODER_KINDS:
        if kind.name == name:
            return kind
    raise IDEncoderError(f"Unknown ID encoder kind {name!r}; expected one of {list(kind_names())}.")


def recognised_kind(checkpoint: Checkpoint, **options) -> EncoderKind:
    """The one kind that recognises the file, or an IDEncoderError naming it and saying what was expected.

    ``options`` go to every kind's ``recognises`` (e.g. ``plus_v2``).
    """
    found = [kind for kind in ENCODER_KINDS if kind.recognises(checkpoint, **options)]
    if len(found) == 1:
        return found[0]
    if found:  # a registry bug, not the file's fault: two kinds' recognition overlaps
        raise IDEncoderError(f"{checkpoint.name} is recognised as {' and as '.join(k.display_name for k in found)}; "
                             f"an ID encoder file must be of one kind. Report this with the file's name.")
    for kind in ENCODER_KINDS:
        if reason := kind.why_not(checkpoint):
            raise IDEncoderError(f"{reason} ID encoders IDFuse reads: {', '.join(kind_names().values())}.")
    found_format = f"metadata format={checkpoint.metadata['format']!r}, " if "format" in checkpoint.metadata else ""
    raise IDEncoderError(f"{checkpoint.name} is neither {' nor '.join(k.expected for k in ENCODER_KINDS)}. Found "
                         f"{found_format}keys {sorted(checkpoint.tensors)[:4]}...")


__all__ = ["ENCODER_KINDS", "EncoderKind", "FaceID", "FaceIDPlus", "FaceIDPlusV2", "IDFuse", "kind_named",
           "kind_names", "recognised_kind"]
