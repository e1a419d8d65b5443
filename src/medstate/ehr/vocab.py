"""The token vocabulary: special tokens first, then task tokens, then codes seen at least `min_count` times in the
training split (most frequent first, ties by name). Anything else maps to [UNK]. Saved with the model as JSON."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from medstate.ehr.sequences import SPECIAL_TOKENS, UNKNOWN
from medstate.errors import MedstateError


class Vocabulary:
    def __init__(self, tokens: list[str]):
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary tokens must be unique")
        self.tokens = list(tokens)
        self.index = {token: i for i, token in enumerate(self.tokens)}
        self.unknown_id = self.index[UNKNOWN]

    @classmethod
    def fit(cls, sequences: Iterable[list[str]], min_count: int = 1, task_tokens: Iterable[str] = ()) -> Vocabulary:
        return cls.from_counts(Counter(token for tokens in sequences for token in tokens), min_count, task_tokens)

    @classmethod
    def from_counts(cls, counts: Counter, min_count: int = 1, task_tokens: Iterable[str] = ()) -> Vocabulary:
        """From training-token counts (summed over shards: the result does not depend on their order)."""
        reserved = [*SPECIAL_TOKENS, *(t for t in task_tokens if t not in SPECIAL_TOKENS)]
        codes = sorted(
            (t for t, n in counts.items() if n >= min_count and t not in reserved), key=lambda t: (-counts[t], t)
        )
        return cls(reserved + codes)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self.index

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.index.get(t, self.unknown_id) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[i] for i in ids]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"tokens": self.tokens}, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            return cls(json.loads(Path(path).read_text())["tokens"])
        except (OSError, ValueError, KeyError) as err:
            raise MedstateError(f"{path} is not a medstate vocabulary file ({err})") from None
