"""Perplexity and bits per byte: against a naive per-document computation written here, and the same value at batch
1 and 8, packed and padded, and for a long document scored in segments with carried state."""

import math

import numpy as np
import pytest
import torch

from medstate.ssm import MambaLM, SSMConfig
from medstate.text.corpora import Document
from medstate.text.evaluate import score_documents

TEXTS = [
    "The patient was given aspirin.",
    "Chest pain resolved; discharged home on day three with follow up.",
    "é ü — non-ASCII bytes count as bytes",
    "aspirin aspirin aspirin",
    "Follow up with the cardiologist in two weeks for a stress test and echo.",
    "x",
    "The patient was discharged.",
    "Pain",
    "Given the findings, we started heparin and monitored the platelet count daily.",
]


@pytest.fixture(params=[1, 2], ids=["mamba1", "mamba2"])
def model(request, small_tokenizer):
    torch.manual_seed(0)
    config = SSMConfig(
        version=request.param,
        vocab_size=len(small_tokenizer),
        d_model=16,
        n_layer=2,
        d_state=4,
        head_dim=8,
        chunk_size=8,
    )
    return MambaLM(config).eval()


def naive(model, tokenizer, text):
    """Sum over the text's tokens of -log softmax(logits)[next token], the document alone from <|endoftext|>."""
    ids = [tokenizer.eos_id, *tokenizer.encode(text)]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    log_probs = torch.log_softmax(logits, -1)
    return -float(sum(log_probs[t, ids[t + 1]] for t in range(len(ids) - 1))), len(ids) - 1


def test_against_the_definition(model, small_tokenizer):
    documents = [Document(str(i), t) for i, t in enumerate(TEXTS)]
    scores = score_documents(model, small_tokenizer, documents, length=64, batch_size=3)
    expected = [naive(model, small_tokenizer, t) for t in TEXTS]
    np.testing.assert_allclose(scores.nll, [e[0] for e in expected], rtol=1e-5)
    assert scores.tokens.tolist() == [e[1] for e in expected]
    total_nll, total_tokens = sum(e[0] for e in expected), sum(e[1] for e in expected)
    assert scores.perplexity() == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
    total_bytes = sum(len(t.encode()) for t in TEXTS)
    assert total_bytes > sum(map(len, TEXTS))  # the non-ASCII line
    assert scores.bits_per_byte() == pytest.approx(total_nll / math.log(2) / total_bytes, rel=1e-5)
    summary = scores.summary(n_bootstrap=200)
    for result in summary.values():
        assert result.low <= result.value <= result.high and result.low < result.high


def test_invariant_to_batch_size_and_layout(model, small_tokenizer):
    documents = [Document(str(i), t) for i, t in enumerate(TEXTS)]
    runs = [
        score_documents(model, small_tokenizer, documents, length=64, batch_size=1),
        score_documents(model, small_tokenizer, documents, length=64, batch_size=8),
        score_documents(model, small_tokenizer, documents, length=40, batch_size=8, layout="padded"),
    ]
    for run in runs[1:]:
        np.testing.assert_allclose(run.nll, runs[0].nll, rtol=1e-5)


def test_long_document_in_segments_equals_whole(model, small_tokenizer):
    text = " ".join(TEXTS * 330)  # about 16,500 tokens
    whole = naive(model, small_tokenizer, text)
    assert whole[1] > 16_384
    for length in (1000, 4096):
        scores = score_documents(model, small_tokenizer, [Document("long", text)], length=length)
        assert scores.tokens[0] == whole[1]
        assert scores.nll[0] == pytest.approx(whole[0], rel=1e-4)
