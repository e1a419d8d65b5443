"""`medstate text notes`: a patient's notes as documents in time order, or a labelled cohort for `text classify`
(from a cohort YAML over structured MEDS data, or from n2c2 2018's train and test folders)."""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from medstate.errors import MedstateError
from medstate.text.notes.cohort import CohortConfig, write_cohort, write_n2c2_cohort
from medstate.text.notes.documents import build_documents, read_notes, unusable_notes, write_documents
from medstate.text.notes.splits import DEFAULT_SPLITS


@dataclass
class NotesExport:
    kind: str  # notes (a documents JSONL) or cohort (a folder with dataset.jsonl and criteria.yaml)
    path: Path
    counts: dict[str, int] = field(default_factory=dict)  # notes: documents, notes and notes left out by reason


def export_notes(
    source: str | Path,
    out: str | Path,
    source_format: str = "auto",
    by: str = "subject",
    until: str | None = None,
    keep_deid: bool = False,
    cohort: str | Path | None = None,
    n2c2_test: str | Path | None = None,
    split: bool = False,
) -> NotesExport:
    """With `n2c2_test`, `source` is n2c2's train folder and a cohort is written; with `cohort` (a YAML that must
    read `source`), a cohort labelled from structured data; otherwise documents, `by` subject or admission, only
    notes written at or before `until` (ISO 8601), each with its patient's split when `split` is set."""
    if n2c2_test is not None:
        return NotesExport("cohort", write_n2c2_cohort(source, n2c2_test, out))
    if cohort is not None:
        settings = CohortConfig.read(cohort)
        if Path(source).resolve() != Path(settings.meds).resolve():
            raise MedstateError(f"{cohort} reads {settings.meds}, not {source}")
        return NotesExport("cohort", write_cohort(settings, out))
    try:
        cut = dt.datetime.fromisoformat(until) if until else None
    except ValueError:
        raise MedstateError(f"--until wants an ISO 8601 time, got {until!r}") from None
    notes = read_notes(source, source_format)
    with warnings.catch_warnings():  # the counts say what was left out
        warnings.simplefilter("ignore")
        documents = build_documents(notes, by, cut, clean_deid=not keep_deid)
    path = write_documents(documents, out, DEFAULT_SPLITS if split else None)
    left_out = {f"notes left out {why}": n for why, n in unusable_notes(notes).items() if n}
    return NotesExport(
        "notes", path, {"documents": len(documents), "notes": sum(d.notes for d in documents), **left_out}
    )
