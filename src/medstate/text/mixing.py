"""A stream of training rows mixed from several corpora by token share, seeded, resumable.

Mixing is exact at the token level: each next piece (at most one row of tokens) comes from the source furthest
below its share of the tokens emitted so far, so the realised shares stay within one piece of the requested ones at
every point of the stream, whatever the document lengths (a weighted-deficit schedule, not sampling). Each source
is read once per epoch in a seeded order (a shuffle buffer, so nothing is held in memory but the buffer) and starts
again when it runs out: a small general-domain corpus is repeated to keep its share.

`state_dict()` is small plain data (per source: epoch, documents drawn, tokens emitted, the rest of the current
document; the part of a piece carried to the next row). Loading it re-reads each source up to where it was without
tokenizing what it skips, and the stream continues exactly as if it had never stopped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np

from medstate.errors import MedstateError
from medstate.text.corpora import CorpusSource, Document, read_documents
from medstate.text.packing import Row, RowBuilder, pieces_of
from medstate.text.tokenizer import TextTokenizer

TOKENIZE_BLOCK = 64  # documents tokenized per call (the tokenizer's threads share a block)


def shuffled(documents: Iterator[Document], buffer_size: int, rng: np.random.Generator) -> Iterator[Document]:
    """A seeded shuffle through a buffer of `buffer_size` documents (a full shuffle when the corpus fits it)."""
    buffer: list[Document] = []
    for document in documents:
        if len(buffer) < buffer_size:
            buffer.append(document)
            continue
        index = int(rng.integers(buffer_size))
        yield buffer[index]
        buffer[index] = document
    for index in rng.permutation(len(buffer)):
        yield buffer[index]


class _Cursor:
    """One source's position: the epoch, documents drawn from it, and the pieces of the current document left."""

    def __init__(self, source: CorpusSource, index: int, stream: MixedStream):
        self.source, self.index, self.stream = source, index, stream
        self.epoch, self.drawn, self.tokens = 0, 0, 0
        self.pending: deque[list[int]] = deque()
        self._documents: Iterator[Document] | None = None
        self._ready: deque[list[int]] = deque()  # tokenized documents read ahead (not yet drawn)

    def _open(self, skip: int) -> None:
        stream = self.stream
        rng = np.random.default_rng([stream.seed, self.index, self.epoch])
        raw = read_documents(self.source)
        excluded = stream.exclude.get(self.source.name)
        if excluded:
            raw = (d for d in raw if d.id not in excluded)
        self._documents = shuffled(raw, stream.shuffle_buffer, rng)
        self._ready.clear()
        for _ in range(skip):
            if next(self._documents, None) is None:
                raise MedstateError(f"corpus {self.source.name!r} has fewer documents than the saved position")

    def next_piece(self) -> list[int]:
        if not self.pending:
            if self._documents is None:
                self._open(self.drawn)
            if not self._ready:
                block = [d.text for d, _ in zip(self._documents, range(TOKENIZE_BLOCK))]
                if not block:
                    if self.drawn == 0:
                        raise MedstateError(f"corpus {self.source.name!r} has no documents left to train on")
                    self.epoch, self.drawn = self.epoch + 1, 0
                    self._open(0)
                    return self.next_piece()
                eos = self.stream.tokenizer.eos_id
                self._ready.extend([*ids, eos] for ids in self.stream.tokenizer.encode_batch(block))
            document = self._ready.popleft()
            self.drawn += 1
            if self.stream.builder.layout == "padded":
                document = document[: self.stream.length]
            self.pending.extend(pieces_of(document, self.stream.length))
        piece = self.pending.popleft()
        self.tokens += len(piece)
        return piece

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "drawn": self.drawn,
            "tokens": self.tokens,
            "pending": [list(p) for p in self.pending],
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.drawn, self.tokens = state["epoch"], state["drawn"], state["tokens"]
        self.pending = deque(state["pending"])
        self._documents = None  # reopened at `drawn` on the next read
        self._ready.clear()


class MixedStream:
    """Rows of `length` tokens from `sources` in proportion to their weights."""

    def __init__(
        self,
        sources: Sequence[CorpusSource],
        tokenizer: TextTokenizer,
        length: int,
        seed: int = 0,
        layout: str = "packed",
        exclude: dict[str, set[str]] | None = None,
        shuffle_buffer: int = 10_000,
    ):
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        if not len(sources) or weights.sum() <= 0:
            raise MedstateError("a text mix needs at least one corpus with a positive weight")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise MedstateError(f"corpus names in a mix must be unique: {names}")
        self.shares = weights / weights.sum()
        self.tokenizer, self.length, self.seed = tokenizer, length, seed
        self.exclude = exclude or {}  # source name -> ids left out (see contamination.find_contamination)
        self.shuffle_buffer = shuffle_buffer
        self.builder = RowBuilder(length, layout, tokenizer.eos_id)
        self.cursors = [_Cursor(s, i, self) for i, s in enumerate(sources)]
        self.rows = 0

    def _next_source(self) -> _Cursor:
        total = sum(c.tokens for c in self.cursors)
        deficits = [
            share * (total + 1) - c.tokens if share > 0 else -np.inf for share, c in zip(self.shares, self.cursors)
        ]
        return self.cursors[int(np.argmax(deficits))]

    def __iter__(self) -> Iterator[Row]:
        return self

    def __next__(self) -> Row:
        builder = self.builder
        builder.start_row()
        while builder.has_row_room():
            builder.add(self._next_source().next_piece())
        self.rows += 1
        return builder.finish_row()

    def realised_shares(self) -> dict[str, float]:
        total = sum(c.tokens for c in self.cursors) or 1
        return {c.source.name: c.tokens / total for c in self.cursors}

    def state_dict(self) -> dict:
        return {"rows": self.rows, "carry": list(self.builder.carry), "sources": [c.state_dict() for c in self.cursors]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["sources"]) != len(self.cursors):
            raise MedstateError("the saved stream has a different number of corpora than this mix")
        self.rows, self.builder.carry = state["rows"], list(state["carry"])
        for cursor, saved in zip(self.cursors, state["sources"]):
            cursor.load_state_dict(saved)
