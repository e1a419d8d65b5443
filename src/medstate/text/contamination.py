"""Keep evaluation text out of training corpora.

A training document is removed when its id is the id of a held-out document (e.g. a PubMed abstract whose PMID is a
PubMedQA test item), or when it contains a large part of a held-out document: at least `min_overlap` of that
document's word n-grams (13 words by default, as in GPT-3's decontamination). Words are lower-cased runs of letters
and digits, so spacing and punctuation (WikiText's ` @-@ `) do not hide a copy. A fraction, not "any shared
n-gram", so that boilerplate (licence lines, section headings) does not remove unrelated documents.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from medstate.errors import MedstateError
from medstate.text.corpora import CorpusSource, Document, read_documents

_WORD = re.compile(r"[^\W_]+")


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass
class ContaminationReport:
    """Removed training documents, by source and reason (`id` or `ngram`), and the held-out documents they match."""

    removed: Counter = field(default_factory=Counter)  # (source, reason) -> count
    removed_ids: list[tuple[str, str, str]] = field(default_factory=list)  # (source, training id, held-out id)
    scanned: Counter = field(default_factory=Counter)  # source -> documents read
    empty: Counter = field(default_factory=Counter)  # source -> documents skipped for having no text

    def excluded(self) -> dict[str, set[str]]:
        """Per source, the ids of the documents to leave out."""
        out: dict[str, set[str]] = {}
        for source, document_id, _ in self.removed_ids:
            out.setdefault(source, set()).add(document_id)
        return out

    def to_dict(self) -> dict:
        by_source: dict[str, dict[str, int]] = {}
        for (source, reason), count in sorted(self.removed.items()):
            by_source.setdefault(source, {})[reason] = count
        return {
            "scanned": dict(self.scanned),
            "empty": dict(self.empty),
            "removed": by_source,
            "documents": [{"source": s, "id": i, "matches": h} for s, i, h in self.removed_ids],
        }


class ContaminationGuard:
    def __init__(self, held_out: Iterable[Document], n: int = 13, min_overlap: float = 0.1):
        if n < 1 or not 0 < min_overlap <= 1:
            raise MedstateError(f"contamination guard: need n >= 1 and 0 < min_overlap <= 1 (got {n}, {min_overlap})")
        self.n, self.min_overlap = n, min_overlap
        self.ids: set[str] = set()
        self.held_ids: list[str] = []
        self.ngram_owner: dict[tuple[str, ...], int] = {}
        self.ngram_counts: list[int] = []
        for document in held_out:
            self.ids.add(document.id)
            grams = word_ngrams(document.text, n)
            index = len(self.held_ids)
            self.held_ids.append(document.id)
            self.ngram_counts.append(len(grams))
            for gram in grams:
                self.ngram_owner.setdefault(gram, index)

    def match(self, document: Document) -> tuple[str, str] | None:
        """(reason, held-out id) when `document` must not be trained on, else None."""
        if document.id in self.ids:
            return "id", document.id
        shared: Counter = Counter()
        for gram in word_ngrams(document.text, self.n):
            owner = self.ngram_owner.get(gram)
            if owner is not None:
                shared[owner] += 1
        for owner, count in shared.most_common():
            if count >= self.min_overlap * self.ngram_counts[owner]:
                return "ngram", self.held_ids[owner]
        return None


def find_contamination(sources: Iterable[CorpusSource], guard: ContaminationGuard) -> ContaminationReport:
    """One pass over each training source: what the guard removes, by source and reason (and how many documents
    had no text)."""
    report = ContaminationReport()
    for source in sources:
        for document in read_documents(source, report.empty):
            report.scanned[source.name] += 1
            found = guard.match(document)
            if found is not None:
                report.removed[(source.name, found[0])] += 1
                report.removed_ids.append((source.name, document.id, found[1]))
    return report
