"""`medstate text eval`: a language model's perplexity and bits per byte on held-out corpora (token-weighted, 95%
intervals over documents) and its PubMedQA accuracy and macro-F1 on the official test split, beside the majority
baseline."""

from __future__ import annotations

from pathlib import Path

from medstate.errors import MedstateError
from medstate.text.biomed.pubmedqa import load_pubmedqa, majority_label, score_pubmedqa
from medstate.text.corpora import read_corpus_list, read_documents
from medstate.text.evaluate import evaluate_corpora
from medstate.text.models import load_language_model
from medstate.text.tokenizer import TextTokenizer


def evaluate_model(
    model_dir: str | Path,
    corpora: str | Path | None = None,
    pubmedqa: str | Path | None = None,
    tokenizer: str | Path | None = None,
    length: int = 2048,
    batch_size: int = 8,
) -> dict:
    """`{"perplexity": {corpus: …}}` for a corpus list YAML and `{"pubmedqa": …}` for a PubMedQA folder (its test
    split, its item count under `items`); the tokenizer is the model's unless given."""
    if corpora is None and pubmedqa is None:
        raise MedstateError("give --corpora FILE and/or --pubmedqa FOLDER")
    model, encoder = load_language_model(model_dir), TextTokenizer.load(tokenizer or model_dir)
    figures: dict = {}
    if corpora is not None:
        documents = {s.name: list(read_documents(s)) for s in read_corpus_list(corpora)}
        figures["perplexity"] = evaluate_corpora(model, encoder, documents, length, batch_size)
    if pubmedqa is not None:
        pool, test = load_pubmedqa(pubmedqa)
        figures["pubmedqa"] = score_pubmedqa(model, encoder, test, majority_label(pool), batch_size).to_dict()
    return figures
