import json
import random

import pytest

from medstate.text.corpora import CorpusSource
from medstate.text.pretrain import PretrainConfig
from medstate.text.tokenizer import train_bpe
from medstate.train.loop import TrainConfig

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


SENTENCES = [
    "the patient was given aspirin for chest pain",
    "discharged home on day three with follow up",
    "heparin was started and the platelet count monitored",
    "the scan showed no acute findings",
    "a random sentence about the weather in spring",
    "the committee met on tuesday to discuss the budget",
]


def bio_text(i):
    rng = random.Random(i)
    words = " ".join(SENTENCES[:4]).split()
    return f"case {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(8, 30)))


@pytest.fixture
def corpus_dir(tmp_path, small_tokenizer):
    small_tokenizer.save(tmp_path / "tok")
    with open(tmp_path / "bio.jsonl", "w") as handle:
        for i in range(40):
            handle.write(json.dumps({"id": i, "text": bio_text(i)}) + "\n")
    with open(tmp_path / "general.jsonl", "w") as handle:
        for i in range(10):
            handle.write(json.dumps({"id": i, "text": f"{SENTENCES[4 + i % 2]} number {i}"}) + "\n")
    with open(tmp_path / "heldout.jsonl", "w") as handle:
        # bio document 7, word for word: the guard must keep it out of training
        handle.write(json.dumps({"id": 100, "text": bio_text(7)}) + "\n")
        handle.write(json.dumps({"id": 101, "text": "heparin and aspirin were given on day three"}) + "\n")
    return tmp_path


@pytest.fixture
def pretrain_config(corpus_dir):
    """A factory: a tiny pretraining config over the corpora of `corpus_dir`, train fields overridable."""
    return lambda **train: _config(corpus_dir, **train)


def _config(corpus_dir, **train):
    return PretrainConfig(
        tokenizer=str(corpus_dir / "tok"),
        model={"version": 2, "d_model": 16, "n_layer": 2, "d_state": 8, "head_dim": 8, "chunk_size": 8},
        seq_len=32,
        batch_size=3,
        corpora=[
            CorpusSource("bio", str(corpus_dir / "bio.jsonl"), id_field="id", weight=0.8),
            CorpusSource("general", str(corpus_dir / "general.jsonl"), id_field="id", weight=0.2),
        ],
        validation=[CorpusSource("heldout", str(corpus_dir / "heldout.jsonl"), id_field="id")],
        ngram=5,
        eval_length=64,
        train=TrainConfig(
            **{
                "max_steps": 8,
                "lr": 3e-3,
                "schedule": "wsd",
                "layer_decay": 0.8,
                "ema_decay": 0.9,
                "save_every": 4,
                "eval_every": 2,
                "warmup_steps": 0,
                **train,
            }
        ),
    )
