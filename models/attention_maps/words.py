"""Prompt words as token positions: which columns of a cross-attention layer's keys belong to each word."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import IDFuseInputError


@dataclass(frozen=True)
class WordPositions:
    """A word of the prompt and the positions of its tokens in the prompt's context (every occurrence)."""

    word: str
    positions: tuple[int, ...]


def parse_words(text: str) -> list[str]:
    """Comma-separated words (or short phrases) -> their list, stripped, empty entries and repeats dropped."""
    words: list[str] = []
    for part in text.split(","):
        word = part.strip()
        if word and word not in words:
            words.append(word)
    return words


def find_positions(prompt_chunks: Sequence[Sequence[object]], word_ids: Sequence[int]) -> tuple[int, ...]:
    """Positions in the prompt's context of every occurrence of the token sequence ``word_ids``.

    ``prompt_chunks``: the tokenizer's chunks of token ids (entries that are not ints, e.g. embedding
    vectors, match nothing); a chunk's positions follow the previous chunks' lengths, as the text
    encoder concatenates the chunks' encodings."""
    found: list[int] = []
    offset = 0
    count = len(word_ids)
    for chunk in prompt_chunks:
        ids = list(chunk)
        for start in range(len(ids) - count + 1):
            if all(isinstance(ids[start + i], int) and ids[start + i] == word_ids[i] for i in range(count)):
                found.extend(range(offset + start, offset + start + count))
        offset += len(ids)
    return tuple(found)


def word_positions(prompt_chunks: Sequence[Sequence[object]], words: Sequence[tuple[str, Sequence[int]]],
                   input_name: str = "words") -> tuple[WordPositions, ...]:
    """Each (word, its token ids) located in the prompt; a word the prompt does not contain is an error."""
    located = []
    for word, ids in words:
        positions = find_positions(prompt_chunks, ids) if ids else ()
        if not positions:
            raise IDFuseInputError(f"{input_name}: the prompt (text) does not contain '{word}'. Write words that occur "
                                   f"in the prompt, separated by commas, or leave {input_name} empty to map every "
                                   f"identity placeholder.")
        located.append(WordPositions(word, positions))
    return tuple(located)


def word_columns(words: Sequence[WordPositions], prompt_length: int, context_length: int,
                 device: torch.device | None = None) -> torch.Tensor | None:
    """(context_length, words) 0/1 matrix: key column j belongs to word w. ComfyUI repeats a prompt up to the
    batch's common context length, so each position counts once per repeat. None when the context is not a
    whole number of repeats of the prompt (another prompt's rows)."""
    if context_length % prompt_length:
        return None
    columns = torch.zeros(context_length, len(words), device=device)
    for index, word in enumerate(words):
        positions = torch.tensor(word.positions, dtype=torch.long)
        repeats = torch.arange(context_length // prompt_length, dtype=torch.long) * prompt_length
        columns[(positions[None] + repeats[:, None]).flatten().to(columns.device), index] = 1.0
    return columns
