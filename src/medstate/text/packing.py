"""Fixed-length rows of token ids for language-model training and scoring.

Packed layout: pieces of documents (each at most one row long) are laid end to end; `seq_idx` numbers the pieces of
a row so that the engine lets no information cross from one to the next, and the label of each piece's first token
is -100 (nothing before it may predict it). A piece that does not fit the rest of a row continues at the start of the
next row. Padded layout (BioMamba's): one document per row, cut at the row length, the rest padding (label -100).

The model shifts labels itself (position t is scored on labels[t + 1]), so a row's first label is never scored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medstate.errors import MedstateError

IGNORE = -100
LAYOUTS = ("packed", "padded")


@dataclass
class Row:
    input_ids: np.ndarray  # int64 [L]
    labels: np.ndarray  # int64 [L], IGNORE where not scored
    seq_idx: np.ndarray  # int32 [L], non-decreasing; padding is a piece of its own
    real_tokens: int  # positions holding document tokens (not padding)


def pieces_of(tokens: Sequence[int], length: int) -> list[list[int]]:
    """A document's tokens cut into consecutive pieces of at most `length`; they concatenate back to `tokens`."""
    if length < 1:
        raise MedstateError(f"piece length must be at least 1, got {length}")
    return [list(tokens[i : i + length]) for i in range(0, len(tokens), length)]


class RowBuilder:
    """Lays pieces into rows of `length` tokens; `carry` (the part of a piece that did not fit) is state to save."""

    def __init__(self, length: int, layout: str, pad_id: int):
        if layout not in LAYOUTS:
            raise MedstateError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
        if length < 2:
            raise MedstateError(f"rows need at least 2 tokens, got {length}")
        self.length, self.layout, self.pad_id = length, layout, pad_id
        self.carry: list[int] = []
        self._pieces: list[list[int]] = []
        self._used = 0

    @property
    def space(self) -> int:
        return self.length - self._used

    def has_row_room(self) -> bool:
        """Whether the row being built takes another piece (padded rows take one)."""
        return self._used < self.length and not (self.layout == "padded" and self._pieces)

    def start_row(self) -> None:
        """Begin a row with the carried part of the last piece, if any."""
        self._pieces, self._used = [], 0
        if self.carry:
            self._pieces.append(self.carry)
            self._used = len(self.carry)
            self.carry = []

    def add(self, piece: list[int]) -> None:
        if self.layout == "padded":
            piece = piece[: self.length]
        elif len(piece) > self.space:
            piece, self.carry = piece[: self.space], piece[self.space :]
        self._pieces.append(piece)
        self._used += len(piece)

    def finish_row(self) -> Row:
        return make_row(self._pieces, self.length, self.pad_id)


def make_row(
    pieces: Sequence[Sequence[int]], length: int, pad_id: int, scored_from: Sequence[int] | None = None
) -> Row:
    """`scored_from[k]`: the first token of piece k that is a label (default 1: all but the first; SFT scores only
    the response)."""
    input_ids = np.full(length, pad_id, dtype=np.int64)
    labels = np.full(length, IGNORE, dtype=np.int64)
    seq_idx = np.empty(length, dtype=np.int32)
    start = 0
    for index, piece in enumerate(pieces):
        end = start + len(piece)
        input_ids[start:end] = piece
        first = 1 if scored_from is None else max(1, scored_from[index])  # the first token has no context here
        labels[start + first : end] = piece[first:]
        seq_idx[start:end] = index
        start = end
    if start > length:
        raise MedstateError(f"pieces of {start} tokens do not fit a row of {length}")
    seq_idx[start:] = len(pieces)
    return Row(input_ids, labels, seq_idx, start)


def pack_documents(
    documents: Iterable[Sequence[int]], length: int, pad_id: int, scored_from: Iterable[int] | None = None
) -> Iterator[Row]:
    """Rows holding whole documents of at most `length` tokens, in order, filled greedily (a document is never cut,
    so its score equals scoring it alone). `scored_from` gives each document's first label position."""
    pieces: list[Sequence[int]] = []
    starts: list[int] = []
    used = 0
    firsts = iter(scored_from) if scored_from is not None else None
    for document in documents:
        first = next(firsts) if firsts is not None else 1
        if len(document) > length:
            raise MedstateError(f"a document of {len(document)} tokens does not fit a row of {length}")
        if used + len(document) > length:
            yield make_row(pieces, length, pad_id, starts)
            pieces, starts, used = [], [], 0
        pieces.append(document)
        starts.append(first)
        used += len(document)
    if pieces:
        yield make_row(pieces, length, pad_id, starts)


def collate(rows: Sequence[Row], packed: bool = True) -> dict[str, torch.Tensor]:
    """A batch: input_ids, labels, seq_idx (packed only) [B, L] and the number of scored labels."""
    batch = {
        "input_ids": torch.from_numpy(np.stack([r.input_ids for r in rows])),
        "labels": torch.from_numpy(np.stack([r.labels for r in rows])),
        "real_tokens": sum(r.real_tokens for r in rows),
    }
    if packed:
        batch["seq_idx"] = torch.from_numpy(np.stack([r.seq_idx for r in rows]))
    return batch


def left_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and seq_idx [B, longest] with each sequence at the right end and its padding as a segment of its
    own: the state after the last position is each sequence's own state, as if read alone."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    seq_idx = torch.zeros((len(sequences), width), dtype=torch.int32)
    for i, sequence in enumerate(sequences):
        input_ids[i, width - len(sequence) :] = torch.as_tensor(sequence)
        seq_idx[i, width - len(sequence) :] = 1
    return input_ids, seq_idx
