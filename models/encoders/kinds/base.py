"""What every kind of ID encoder says about itself: how to recognise its files, build an encoder from
one, turn a face into ID tokens, and save.

A kind is a stateless object; ``IDEncoder.encoder_kind`` is the one that built the encoder. The
loader asks every kind in ``ENCODER_KINDS`` (``kinds/__init__.py``) whether it recognises a file, and
exactly one must.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...errors import IDEncoderError
from ...faces.types import ARCFACE_W600K_512

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint
    from ..modules import FaceMapper, IDEncoder, PerceiverResampler


class EncoderKind:
    name: str  # IDEncoder.kind: "faceid", "idfuse", ...
    display_name: str  # for people: "IP-Adapter FaceID"
    expected: str  # what its files look like, for the error on a file that no kind recognises
    needs_clip_vision: bool  # has a CLIP mapper, so encode needs CLIP vision hidden states
    learned_clip_queries: bool = False  # its CLIP mapper has its own queries (else the face tokens are its queries)
    # The face embedding space (models.faces.types.EMBEDDING_SPACES) its files were trained on, unless a file says.
    embedding_space: str = ARCFACE_W600K_512

    def recognises(self, checkpoint: Checkpoint, **options) -> bool:
        """Whether the file is of this kind. ``options`` are the loader's (e.g. ``plus_v2``); ignore unknown ones.

        Look only, take nothing: every kind is asked about every file.
        """
        raise NotImplementedError

    def why_not(self, checkpoint: Checkpoint) -> str | None:
        """For a file no kind recognises: why it is not of this kind, when it looks like one (a sentence
        naming the file), else None."""
        return None

    def build(self, checkpoint: Checkpoint) -> IDEncoder:
        """The encoder of a file this kind recognises, taking (``checkpoint.take``) every tensor it uses."""
        raise NotImplementedError

    def check_mappers(self, face_mapper: FaceMapper, clip_mapper: PerceiverResampler | None, where: str) -> None:
        """Raise unless the mappers are the ones this kind has (``where`` names the encoder)."""
        if (clip_mapper is not None) != self.needs_clip_vision:
            raise IDEncoderError(f"{where}: {self.display_name} encoders "
                                 f"{'need a' if self.needs_clip_vision else 'have no'} CLIP mapper.")
        if clip_mapper is not None and (clip_mapper.num_latents > 0) != self.learned_clip_queries:
            queries = "have learned queries" if self.learned_clip_queries else "take the face tokens as queries"
            found = "has none" if self.learned_clip_queries else "has learned ones"
            raise IDEncoderError(f"{where}: {self.display_name} CLIP mappers {queries}, but this one {found}.")

    def encode(self, encoder: IDEncoder, face_embeds: torch.Tensor, clip_hidden: torch.Tensor | None,
               **options) -> torch.Tensor:
        """ID tokens (B, T, C) from checked inputs on the encoder's device and dtype (``clip_hidden`` is None
        for kinds without a CLIP mapper). ``options``: ``shortcut_scale``; ignore the ones you do not use."""
        raise NotImplementedError

    def loaded_note(self, encoder: IDEncoder) -> str | None:
        """Something a person loading this encoder should know (how its kind was told), or None."""
        return None

    def metadata(self, encoder: IDEncoder, training: dict | None) -> dict[str, str]:
        """The metadata of this kind's own file format."""
        raise self._not_ours(encoder)

    def save(self, encoder: IDEncoder, path: str | os.PathLike, training: dict | None) -> Path:
        """Write the encoder in IDFuse's format; kinds read from other projects' files refuse."""
        raise self._not_ours(encoder)

    def _not_ours(self, encoder: IDEncoder) -> IDEncoderError:
        return IDEncoderError(f"Only IDFuse encoders are saved in the IDFuse format; {encoder.source} is "
                              f"{self.display_name}: keep using its original file.")
