"""Prompt-based multi-label classification of long documents (ClinicalMamba's recipe), with state branching.

Each label is a criterion asked as a question after the document; the model's answer slot is the position after

    <document>\\n\\nQuestion: <question>\\nAnswer:

and the criterion's score is logit(" yes") − logit(" no") there (of the tokens that begin them, where a small
tokenizer splits them). Training is cross-entropy at each slot with target
" yes" or " no" (over the whole vocabulary, as ClinicalMamba).

ClinicalMamba appends all questions to one sequence, so K criteria are read after one another and each question
sees the earlier ones (and their order matters). Here the document is read once, its recurrent state is copied K
times, and each question continues from its own copy (`branched_slot_logits`): K criteria cost one document plus K
short questions, every score equals reading that document + question alone (`reencoded_slot_logits`, the reference
twin), and no question sees another. A document longer than `max_document_tokens` loses its start; the questions
are never cut. The same code runs the Transformer baseline (`text.transformer`), whose state is its key/value cache
and whose documents are also cut to leave the questions room within its learned positions. Gradients flow
through the branches into the document's reading.

Thresholds are chosen on the tuning split only (`tune_thresholds`: one per label for its F1, and one global for
micro-F1) and applied unchanged to the test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medstate.errors import MedstateError
from medstate.text.choices import encode_prompt
from medstate.text.tokenizer import TextTokenizer

QUESTION_TEMPLATE = "\n\nQuestion: {question}\nAnswer:"
ANSWERS = (" yes", " no")


@dataclass(frozen=True)
class Criterion:
    name: str
    question: str


def answer_ids(tokenizer: TextTokenizer) -> tuple[int, int]:
    """The first token of " yes" and of " no" (one token each in GPT-NeoX's tokenizer; a small BPE may split them,
    and the slot then compares the tokens that begin them, which must differ)."""
    ids = [tokenizer.encode(answer) for answer in ANSWERS]
    if not all(ids) or ids[0][0] == ids[1][0]:
        raise MedstateError(f"the answers {ANSWERS} must begin with different tokens in this tokenizer, got {ids}")
    return ids[0][0], ids[1][0]


def question_ids(tokenizer: TextTokenizer, criteria: Sequence[Criterion]) -> list[list[int]]:
    return [tokenizer.encode(QUESTION_TEMPLATE.format(question=c.question)) for c in criteria]


def document_budget(model, questions: Sequence[Sequence[int]], max_document_tokens: int | None) -> int | None:
    """How many document tokens to keep (from the end): `max_document_tokens`, and for a model with learned
    positions (the Transformer baseline's `max_positions`) no more than leave room for the longest question."""
    limit = getattr(model, "max_positions", None)
    if limit is None:
        return max_document_tokens
    room = limit - max(len(q) for q in questions)
    if room < 2:
        raise MedstateError(f"a question is longer than the model's {limit} positions")
    return room if max_document_tokens is None else min(room, max_document_tokens)


def _last_hidden(model, input_ids: torch.Tensor, lengths: torch.Tensor, state=None) -> torch.Tensor:
    """Final hidden state at each row's last real token ([B, D]); rows are right-padded, which a causal model never
    reads back."""
    hidden, _ = model.backbone(input_ids, None, state, None, False)
    return hidden[torch.arange(len(lengths), device=hidden.device), lengths - 1]


def _right_padded(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.as_tensor(sequence)
    return ids.to(device), torch.tensor([len(s) for s in sequences], device=device)


def branched_slot_logits(
    model,
    tokenizer: TextTokenizer,
    document: str,
    criteria: Sequence[Criterion],
    max_document_tokens: int | None = None,
) -> torch.Tensor:
    """[K, V] next-token logits at each criterion's answer slot: the document read once, each question continuing
    from its own copy of the state. Differentiable (call under torch.no_grad() to score)."""
    device = next(model.parameters()).device
    asked = question_ids(tokenizer, criteria)
    budget = document_budget(model, asked, max_document_tokens)
    document_ids = torch.tensor([encode_prompt(tokenizer, document, budget)], device=device)
    _, state = model.backbone(document_ids, None, None, None, True)
    questions, lengths = _right_padded(asked, tokenizer.eos_id, device)
    branches = state.select([0] * len(criteria))
    hidden = _last_hidden(model, questions, lengths, branches)
    return model.lm_head(hidden.to(model.lm_head.weight.dtype)).float()


def reencoded_slot_logits(
    model,
    tokenizer: TextTokenizer,
    document: str,
    criteria: Sequence[Criterion],
    max_document_tokens: int | None = None,
) -> torch.Tensor:
    """Reference twin of `branched_slot_logits`: each document + question read as one sequence of its own."""
    device = next(model.parameters()).device
    asked = question_ids(tokenizer, criteria)
    document_ids = encode_prompt(tokenizer, document, document_budget(model, asked, max_document_tokens))
    rows = []
    for ids in asked:
        sequence = torch.tensor([document_ids + ids], device=device)
        hidden = _last_hidden(model, sequence, torch.tensor([sequence.shape[1]], device=device))
        rows.append(model.lm_head(hidden.to(model.lm_head.weight.dtype)).float()[0])
    return torch.stack(rows)


@torch.no_grad()
def criterion_scores(
    model,
    tokenizer: TextTokenizer,
    documents: Sequence[str],
    criteria: Sequence[Criterion],
    max_document_tokens: int | None = None,
    progress=None,
) -> np.ndarray:
    """[N, K] logit(" yes") − logit(" no") of every criterion for every document."""
    yes, no = answer_ids(tokenizer)
    was_training = model.training
    model.eval()
    scores = np.zeros((len(documents), len(criteria)))
    for row, document in enumerate(documents):
        logits = branched_slot_logits(model, tokenizer, document, criteria, max_document_tokens)
        scores[row] = (logits[:, yes] - logits[:, no]).double().cpu().numpy()
        if progress is not None:
            progress(row + 1, len(documents))
    model.train(was_training)
    return scores


def slot_loss(
    model,
    tokenizer: TextTokenizer,
    document: str,
    criteria: Sequence[Criterion],
    labels: Sequence[bool],
    max_document_tokens: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over the criteria of the answer slot against " yes" (label true) or " no"."""
    yes, no = answer_ids(tokenizer)
    logits = branched_slot_logits(model, tokenizer, document, criteria, max_document_tokens)
    targets = torch.tensor([yes if label else no for label in labels], device=logits.device)
    return F.cross_entropy(logits, targets)


@dataclass(frozen=True)
class Thresholds:
    per_label: list[float]  # each label's F1-best threshold on the tuning split (0.0 where it has no positives)
    global_: float  # one threshold for every label, best micro-F1 on the tuning split


def _f1(y: np.ndarray, predicted: np.ndarray) -> float:
    tp = int((predicted & y).sum())
    fp, fn = int((predicted & ~y).sum()), int((~predicted & y).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def tune_thresholds(tuning_labels: np.ndarray, tuning_scores: np.ndarray) -> Thresholds:
    """Thresholds from the tuning split only: predicted positive when score >= threshold."""
    y, s = np.asarray(tuning_labels, dtype=bool), np.asarray(tuning_scores, dtype=float)
    if y.shape != s.shape or y.ndim != 2:
        raise MedstateError(f"labels {y.shape} and scores {s.shape} must both be [documents, labels]")
    per_label = []
    for k in range(y.shape[1]):
        candidates = np.unique(s[:, k])
        f1 = [_f1(y[:, k], s[:, k] >= t) for t in candidates]
        per_label.append(float(candidates[int(np.argmax(f1))]) if y[:, k].any() else 0.0)
    candidates = np.unique(s)
    micro = [_f1(y, s >= t) for t in candidates]
    return Thresholds(per_label, float(candidates[int(np.argmax(micro))]))
