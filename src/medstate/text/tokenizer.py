"""Tokenizers for text models: any local Hugging Face tokenizer (a directory with `tokenizer.json`, or GPT-2 style
`vocab.json` + `merges.txt`), or a small byte-level BPE trained here for demos.

The GPT-NeoX-20B tokenizer of the state-spaces Mamba checkpoints has 50,277 ids; the checkpoints pad their
embedding matrix to a multiple (Mamba-1 to 50,280, a multiple of 8; Mamba-2 to 50,288, a multiple of 16) so that
the vocabulary projection tiles evenly. `padded_vocab_size` gives that size for a new model; ids past the
tokenizer's last id are never produced and never scored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from medstate.errors import MedstateError

END_OF_TEXT = "<|endoftext|>"


class TextTokenizer:
    """A `tokenizers.Tokenizer` with the end-of-text id the text recipes separate and end documents with."""

    def __init__(self, tokenizer: Tokenizer, eos_token: str = END_OF_TEXT):
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise MedstateError(f"the tokenizer has no {eos_token!r} token; pass the end-of-text token it uses")
        self.tokenizer, self.eos_token, self.eos_id = tokenizer, eos_token, eos_id

    @classmethod
    def load(cls, path: str | Path, eos_token: str | None = None) -> TextTokenizer:
        """A tokenizer directory (`tokenizer.json`, or `vocab.json` + `merges.txt`) or a `tokenizer.json` file."""
        path = Path(path)
        try:
            if path.is_file():
                tokenizer = Tokenizer.from_file(str(path))
            elif (path / "tokenizer.json").is_file():
                tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                tokenizer = _byte_level(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
            else:
                raise MedstateError(f"{path}: no tokenizer.json (or vocab.json + merges.txt) there")
        except Exception as err:  # tokenizers raises its own Exception type for a malformed file
            if isinstance(err, MedstateError):
                raise
            raise MedstateError(f"{path}: not a readable tokenizer ({str(err).splitlines()[0]})") from None
        if eos_token is None:
            config = path / "tokenizer_config.json" if path.is_dir() else path.with_name("tokenizer_config.json")
            eos_token = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
        return cls(tokenizer, eos_token or END_OF_TEXT)

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once, on the tokenizer library's own threads."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | Path) -> Path:
        """`tokenizer.json` + `tokenizer_config.json`, loadable by `TextTokenizer.load` and by transformers'
        `PreTrainedTokenizerFast.from_pretrained`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "bos_token": self.eos_token,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return directory


def padded_vocab_size(n_ids: int, multiple: int = 16) -> int:
    """The embedding rows a model needs for `n_ids` token ids, rounded up to a multiple (16 as in Mamba-2)."""
    if multiple < 1:
        raise MedstateError(f"the vocabulary multiple must be >= 1, got {multiple}")
    return -(-n_ids // multiple) * multiple


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
    """A byte-level BPE (GPT-2 style: every byte string encodes and decodes back exactly) with `<|endoftext|>` as
    id 0, trained on `texts` (any iterable, streamed through the trainer)."""
    if vocab_size < 257:
        raise MedstateError(f"a byte-level BPE needs vocab_size >= 257 (256 bytes + end of text), got {vocab_size}")
    tokenizer = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tokenizer, END_OF_TEXT)


def _byte_level(model: models.Model) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer
