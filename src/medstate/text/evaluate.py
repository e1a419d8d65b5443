"""Language-model quality on held-out documents: token-weighted perplexity and bits per byte, with bootstrap
intervals over documents.

Each document is scored as `<|endoftext|>` followed by its tokens: every token of the text is predicted (the end
of text is the context a document starts from, as in the Pile-trained checkpoints), nothing else is. Perplexity is
exp(total negative log-likelihood / total tokens), weighted by tokens over the whole set rather than averaged over
batches; bits per byte is total NLL / (ln 2 · total UTF-8 bytes), which does not depend on the tokenizer, so models
with different vocabularies compare. The numbers do not depend on batch size or layout: documents that fit a row are
packed (with `seq_idx`, so they never see each other) or padded, and a longer document is scored in segments with
the recurrent state carried from one to the next, which equals scoring it whole.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medstate.errors import MedstateError
from medstate.eval.metrics import MetricResult
from medstate.text.corpora import Document
from medstate.text.packing import IGNORE, LAYOUTS, collate, make_row, pack_documents
from medstate.text.tokenizer import TextTokenizer

N_BOOTSTRAP = 1000


@dataclass
class DocumentScores:
    """Per document: summed negative log-likelihood (nats), scored tokens, UTF-8 bytes."""

    ids: list[str]
    nll: np.ndarray
    tokens: np.ndarray
    bytes: np.ndarray

    def perplexity(self) -> float:
        return math.exp(self.nll.sum() / self.tokens.sum())

    def bits_per_byte(self) -> float:
        return float(self.nll.sum() / (math.log(2) * self.bytes.sum()))

    def summary(self, n_bootstrap: int = N_BOOTSTRAP, seed: int = 0) -> dict[str, MetricResult]:
        """Perplexity, bits per byte and nats per token, each with a 95% interval from resampling documents."""
        rng = np.random.default_rng(seed)
        chosen = rng.integers(0, len(self.ids), size=(n_bootstrap, len(self.ids)))
        nll, tokens, size = self.nll[chosen].sum(1), self.tokens[chosen].sum(1), self.bytes[chosen].sum(1)
        metrics = {
            "perplexity": (self.perplexity(), np.exp(nll / tokens)),
            "bits_per_byte": (self.bits_per_byte(), nll / (math.log(2) * size)),
            "nats_per_token": (float(self.nll.sum() / self.tokens.sum()), nll / tokens),
        }
        out = {}
        for name, (value, resampled) in metrics.items():
            low, high = np.percentile(resampled, [2.5, 97.5])
            out[name] = MetricResult(float(value), float(low), float(high), "ok", n_bootstrap)
        return out


def evaluate_corpora(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    corpora: dict[str, list[Document]],
    length: int = 2048,
    batch_size: int = 8,
) -> dict[str, dict]:
    """Per corpus: documents, tokens, bytes, and perplexity, bits per byte and nats per token with 95% intervals."""
    figures = {}
    for name, documents in corpora.items():
        if not documents:
            raise MedstateError(f"corpus {name!r} has no documents to evaluate on")
        scores = score_documents(model, tokenizer, documents, length, batch_size)
        figures[name] = {
            "documents": len(documents),
            "tokens": int(scores.tokens.sum()),
            "bytes": int(scores.bytes.sum()),
            **{metric: dataclasses.asdict(result) for metric, result in scores.summary().items()},
        }
    return figures


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per position, in float32 (IGNORE targets give 0)."""
    flat = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return flat.view(targets.shape)


@torch.no_grad()
def score_documents(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    documents: Iterable[Document],
    length: int = 2048,
    batch_size: int = 8,
    layout: str = "packed",
    progress: Callable[[int], None] | None = None,
) -> DocumentScores:
    """Score every document (see the module's docstring). `length` is the row length, and the segment length of a
    document longer than a row."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    documents = list(documents)
    sequences = [[tokenizer.eos_id, *ids] for ids in tokenizer.encode_batch([d.text for d in documents])]
    nll = np.zeros(len(documents))
    short = [i for i, s in enumerate(sequences) if len(s) <= length]
    for i in (i for i, s in enumerate(sequences) if len(s) > length):
        nll[i] = _score_in_segments(model, sequences[i], length)
        if progress:
            progress(1)
    if layout not in LAYOUTS:
        raise MedstateError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if layout == "packed":
        rows = list(pack_documents((sequences[i] for i in short), length, tokenizer.eos_id))
        batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    else:  # one document per row, padded to the longest of its batch
        groups = [[sequences[i] for i in short[j : j + batch_size]] for j in range(0, len(short), batch_size)]
        batches = [[make_row([s], max(map(len, g)), tokenizer.eos_id) for s in g] for g in groups]
    owners = iter(short)
    for part in batches:
        batch = collate(part, packed=layout == "packed")
        seq_idx = batch["seq_idx"].to(device) if "seq_idx" in batch else None
        logits = model(batch["input_ids"].to(device), seq_idx=seq_idx).logits
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
        per_token = _token_nll(logits, targets.to(device)).double().cpu().numpy()
        for r, row in enumerate(part):
            scored = targets[r].numpy() != IGNORE
            for piece in range(int(row.seq_idx[: row.real_tokens].max()) + 1):
                nll[next(owners)] = per_token[r][(row.seq_idx == piece) & scored].sum()
        if progress:
            progress(len(part))
    model.train(was_training)
    return DocumentScores(
        [d.id for d in documents],
        nll,
        np.array([len(s) - 1 for s in sequences], dtype=np.float64),
        np.array([len(d.text.encode("utf-8")) for d in documents], dtype=np.float64),
    )


def _score_in_segments(model: torch.nn.Module, sequence: Sequence[int], length: int) -> float:
    """A long document segment by segment with the state carried: position t of a segment predicts token t + 1,
    which may be the first token of the next segment (known already). A model with learned positions
    (`max_positions`, the Transformer baseline) cannot carry its cache past them: each segment is read after at most
    `max_positions - length` earlier tokens (a sliding window) and only its own positions are scored."""
    tokens = torch.tensor(sequence, device=next(model.parameters()).device)
    limit = getattr(model, "max_positions", None)
    if limit is not None and length >= limit:
        raise MedstateError(f"the row length {length} must be below the model's {limit} positions")
    total, state = 0.0, None
    for start in range(0, len(sequence) - 1, length):
        segment = tokens[start : start + length]
        targets = tokens[start + 1 : start + 1 + len(segment)]
        if limit is None:
            out = model(segment[None], state=state, return_state=True)
            state, logits = out.state, out.logits[0]
        else:
            context = min(start, limit - length)
            logits = model(tokens[start - context : start + len(segment)][None]).logits[0, context:]
        total += float(_token_nll(logits[: len(targets)], targets).double().sum())
    return total
