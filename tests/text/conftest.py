import json
import random

import pytest
import torch

from medstate.text.biomed.pretrain import PretrainConfig
from medstate.text.corpora import CorpusSource
from medstate.text.tokenizer import padded_vocab_size, train_bpe
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


@pytest.fixture
def pair(small_tokenizer, tmp_path):
    """The same random Mamba-2 weights as Hugging Face transformers' Mamba2ForCausalLM and as medstate's model."""
    transformers = pytest.importorskip("transformers")
    from medstate.ssm import load_pretrained

    torch.manual_seed(0)
    config = transformers.Mamba2Config(
        vocab_size=padded_vocab_size(len(small_tokenizer)), hidden_size=32, state_size=8, num_hidden_layers=2,
        expand=2, conv_kernel=4, num_heads=8, head_dim=8, n_groups=2, chunk_size=16,
    )  # fmt: skip
    hf = transformers.Mamba2ForCausalLM(config)
    with torch.no_grad():  # random init leaves many parameters at 0 or 1
        for name, p in hf.named_parameters():
            if "A_log" not in name and "dt" not in name:
                p.add_(torch.randn_like(p) * 0.2)
    hf.eval().save_pretrained(tmp_path / "hf")
    return hf, load_pretrained(tmp_path / "hf")
