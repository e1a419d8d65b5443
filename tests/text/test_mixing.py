"""Mixing: realised token shares counted from the rows themselves (each source writes its own words), a seeded
order, and a resumed stream that continues exactly."""

import json
from collections import Counter

import numpy as np
import pytest

from medstate import MedstateError
from medstate.text.corpora import CorpusSource
from medstate.text.mixing import MixedStream, shuffled
from medstate.text.tokenizer import train_bpe

ALPHABETS = {"bio": "ab", "c4": "cd", "wiki": "ef"}  # source -> the letters its words are made of


def write_source(tmp_path, name, n_documents, seed):
    rng = np.random.default_rng(seed)
    letters = ALPHABETS[name]
    with open(tmp_path / f"{name}.jsonl", "w") as handle:
        for i in range(n_documents):
            words = ["".join(rng.choice(list(letters), size=rng.integers(1, 4))) for _ in range(rng.integers(2, 60))]
            handle.write(json.dumps({"id": i, "text": "".join(words)}) + "\n")  # no spaces: every token is a letter
    return tmp_path / f"{name}.jsonl"


@pytest.fixture
def setup(tmp_path):
    paths = {
        name: write_source(tmp_path, name, n, i) for i, (name, n) in enumerate([("bio", 300), ("c4", 40), ("wiki", 25)])
    }
    tokenizer = train_bpe([" ".join(ALPHABETS)], vocab_size=257, min_frequency=1)  # bytes only: one id per letter
    return paths, tokenizer


def sources(paths, weights):
    return [CorpusSource(name, str(paths[name]), id_field="id", weight=weights[name]) for name in paths]


def source_of(token_id, tokenizer):
    letter = tokenizer.decode([token_id]).strip()
    return next((name for name, letters in ALPHABETS.items() if letter in letters), None) if letter else None


def test_realised_shares_within_half_a_point(setup):
    paths, tokenizer = setup
    weights = {"bio": 0.8, "c4": 0.1, "wiki": 0.1}
    stream = MixedStream(sources(paths, weights), tokenizer, length=64, seed=3)
    counts, previous = Counter(), None
    for _ in range(400):
        row = next(stream)
        for token in row.input_ids[: row.real_tokens]:
            # a letter tells its source; an end of text belongs to the document it ends
            previous = source_of(int(token), tokenizer) or previous
            counts[previous] += 1
    total = sum(counts.values())
    assert total == 400 * 64
    for name, weight in weights.items():
        assert abs(counts[name] / total - weight) < 0.005, (name, counts[name] / total)
    # the small sources were repeated (several epochs) to keep their shares
    assert stream.cursors[2].epoch >= 1


def test_seeded_order_and_exact_resume(setup):
    paths, tokenizer = setup
    weights = {"bio": 0.5, "c4": 0.3, "wiki": 0.2}
    uninterrupted = MixedStream(sources(paths, weights), tokenizer, length=48, seed=7, shuffle_buffer=50)
    rows = [next(uninterrupted).input_ids.tolist() for _ in range(120)]
    first = MixedStream(sources(paths, weights), tokenizer, length=48, seed=7, shuffle_buffer=50)
    for _ in range(57):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # plain data
    resumed = MixedStream(sources(paths, weights), tokenizer, length=48, seed=7, shuffle_buffer=50)
    resumed.load_state_dict(state)
    assert [next(resumed).input_ids.tolist() for _ in range(63)] == rows[57:]
    other_seed = MixedStream(sources(paths, weights), tokenizer, length=48, seed=8, shuffle_buffer=50)
    assert [next(other_seed).input_ids.tolist() for _ in range(5)] != rows[:5]


def test_padded_layout_one_document_per_row(setup):
    paths, tokenizer = setup
    stream = MixedStream(sources(paths, {"bio": 1, "c4": 0, "wiki": 0}), tokenizer, length=64, layout="padded")
    for _ in range(20):
        row = next(stream)
        assert (row.seq_idx[: row.real_tokens] == 0).all()
        ends = np.flatnonzero(row.input_ids[: row.real_tokens] == tokenizer.eos_id)
        assert len(ends) <= 1 and (len(ends) == 0 or ends[0] == row.real_tokens - 1)


def test_shuffle_is_a_permutation():
    from medstate.text.corpora import Document

    documents = [Document(str(i), "x") for i in range(100)]
    out = list(shuffled(iter(documents), 16, np.random.default_rng(0)))
    assert sorted(int(d.id) for d in out) == list(range(100)) and [d.id for d in out] != [d.id for d in documents]


def test_mix_errors(setup, tmp_path):
    paths, tokenizer = setup
    with pytest.raises(MedstateError, match="positive weight"):
        MixedStream(sources(paths, {"bio": 0, "c4": 0, "wiki": 0}), tokenizer, length=16)
    (tmp_path / "empty.jsonl").write_text("")
    stream = MixedStream([CorpusSource("empty", str(tmp_path / "empty.jsonl"))], tokenizer, length=16)
    with pytest.raises(MedstateError, match="no documents"):
        next(stream)
