"""Tokenizers: the GPT-NeoX-20B file against transformers and against ids published for the Mamba checkpoints;
a trained byte-level BPE round-trips any text; vocabulary padding as the Mamba checkpoints do it."""

import pytest

from medstate import MedstateError
from medstate.text.tokenizer import TextTokenizer, padded_vocab_size, train_bpe

TEXTS = [
    "Hey how are you doing?",
    "Naloxone reverses the antihypertensive effect of clonidine.\n\nIn unanesthetized rats  (n=12)…",
    "Patient: 67 y/o ♀, BP 142/91 mmHg; Dx: HTN — start lisinopril 10 mg.",
]


@pytest.fixture
def neox(shared_data):
    return TextTokenizer.load(shared_data / "tokenizers" / "gpt-neox-20b-tokenizer")


def test_neox_ids_match_published_and_transformers(neox, shared_data):
    from transformers import PreTrainedTokenizerFast

    # ids the public Mamba ports hard-code for these sentences (see the tokenizer's SOURCE.md)
    assert neox.encode("Hey how are you doing?") == [8262, 849, 403, 368, 2509, 32]
    assert neox.encode("Hello, my dog is cute") == [12092, 13, 619, 4370, 310, 20295]
    reference = PreTrainedTokenizerFast(
        tokenizer_file=str(shared_data / "tokenizers/gpt-neox-20b-tokenizer/tokenizer.json")
    )
    for text in TEXTS:
        assert neox.encode(text) == reference(text, add_special_tokens=False)["input_ids"]
        assert neox.decode(neox.encode(text)) == text
    assert neox.encode_batch(TEXTS) == [neox.encode(t) for t in TEXTS]
    assert len(neox) == 50277 and neox.eos_id == 0


def test_padded_vocab_sizes_of_the_mamba_checkpoints():
    assert padded_vocab_size(50277, 16) == 50288  # Mamba-2
    assert padded_vocab_size(50277, 8) == 50280  # Mamba-1
    assert padded_vocab_size(64, 16) == 64


def test_gpt2_vocab_and_merges_directory(shared_data, tmp_path):
    directory = tmp_path / "gpt2"
    directory.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (directory / name).write_bytes((shared_data / "tokenizers/gpt2-tokenizer" / name).read_bytes())
    from_files = TextTokenizer.load(directory)
    from_json = TextTokenizer.load(shared_data / "tokenizers/gpt2-tokenizer")
    for text in TEXTS:
        assert from_files.encode(text) == from_json.encode(text)


def test_trained_bpe_round_trips_and_saves_for_transformers(small_tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast

    for text in [*TEXTS, "", "  leading spaces", "emoji 🩺 and tabs\t\n"]:
        assert small_tokenizer.decode(small_tokenizer.encode(text)) == text
    assert small_tokenizer.eos_id == 0
    assert len(small_tokenizer.encode("the patient was given aspirin")) < len("the patient was given aspirin")
    small_tokenizer.save(tmp_path / "tok")
    again = TextTokenizer.load(tmp_path / "tok")
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    for text in TEXTS:
        assert again.encode(text) == small_tokenizer.encode(text) == hf(text)["input_ids"]
    assert hf.eos_token_id == 0


def test_tokenizer_errors_are_user_errors(tmp_path):
    with pytest.raises(MedstateError, match=r"no tokenizer\.json"):
        TextTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(MedstateError, match="not a readable tokenizer"):
        TextTokenizer.load(tmp_path)
    with pytest.raises(MedstateError, match="vocab_size"):
        train_bpe(["x"], vocab_size=100)
