import pytest

from medstate.text.tokenizer import train_bpe

WORDS = [
    "the",
    "patient",
    "was",
    "given",
    "aspirin",
    "for",
    "chest",
    "pain",
    "and",
    "discharged",
    "home",
    "on",
    "day",
    "three",
    "with",
    "follow",
    "up",
]


@pytest.fixture(scope="session")
def small_tokenizer():
    """A byte-level BPE trained on a few sentences: small vocabulary, every byte string encodable."""
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 5
    return train_bpe(texts, vocab_size=300, min_frequency=1)
