"""Conversion accounting: nothing is dropped silently.

Every reader counts, per source (a MIMIC-IV table or a FHIR resource type), the records it read, the events it
wrote, the records it skipped by reason and the values it had to blank by reason. Lenient mode (the default) counts
and goes on; strict mode stops at the first problem with a one-line error naming the file and line or record.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from medstate.errors import MedstateError


@dataclass
class SourceCounts:
    read: int = 0
    converted: int | None = None  # records that became events (FHIR resources, MIMIC-IV rows)
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    coerced: Counter = field(default_factory=Counter)
    # events identical in every column to another event (e.g. a weight repeated for each infusion started at the
    # same minute): written once. The records themselves were converted, so this is not a skip.
    duplicates_merged: int = 0

    def as_dict(self) -> dict:
        return {
            "read": self.read,
            "converted": self.converted,
            "written": self.written,
            "skipped": dict(sorted(self.skipped.items())),
            "coerced": dict(sorted(self.coerced.items())),
            "duplicates_merged": self.duplicates_merged,
        }


class ConversionReport:
    """Counts per source. `problem()` is the single place where strictness is decided."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.sources: dict[str, SourceCounts] = defaultdict(SourceCounts)
        self.notes: list[str] = []
        self.ignored: Counter = Counter()  # records read that carry no event by design (e.g. FHIR Organization)
        self.lost_files: list[dict] = []  # files (or their rest) that could not be read at all

    def read(self, source: str, n: int = 1) -> None:
        self.sources[source].read += n

    def written(self, source: str, n: int) -> None:
        self.sources[source].written += n

    def problem(self, source: str, reason: str, where: str, n: int = 1, kept: bool = False) -> None:
        """Record `n` bad records (or values, when `kept`: the record stays with the value blanked).

        `where` locates the first of them for the strict-mode message, e.g. "labevents.csv.gz line 12"."""
        if n <= 0:
            return
        if self.strict:
            raise MedstateError(
                f"{where}: {reason} (strict mode stops at the first bad record; drop --strict to skip and count)"
            )
        counts = self.sources[source]
        (counts.coerced if kept else counts.skipped)[reason] += n

    def left_out(self, source: str, reason: str) -> None:
        """A valid record that is not a clinical fact (e.g. FHIR entered-in-error): counted as skipped, and strict
        mode goes on, since the input is not at fault."""
        self.sources[source].skipped[reason] += 1

    def carried_elsewhere(self, source: str, reason: str) -> None:
        """A value left out here because it is carried by another event (nothing is lost: strict mode goes on)."""
        self.sources[source].coerced[reason] += 1

    def ignore(self, source: str) -> None:
        self.ignored[source] += 1

    def converted(self, source: str, n: int = 1) -> None:
        counts = self.sources[source]
        counts.converted = (counts.converted or 0) + n

    def counts_conversions(self, source: str) -> None:
        """This source's reader counts converted records (so read = converted + skipped + ignored must hold)."""
        counts = self.sources[source]
        counts.converted = counts.converted or 0

    def lost_file(self, path: Path, reason: str, records_read: int, records_estimated: int | None = None) -> None:
        """A file, or the rest of it, that could not be read: listed apart from skipped records (strict: stop)."""
        size = Path(path).stat().st_size if Path(path).is_file() else None
        if self.strict:
            raise MedstateError(
                f"{path}: {reason} (strict mode stops at a file it cannot read; drop --strict to go on)"
            )
        self.lost_files.append(
            {"path": str(path), "bytes": size, "reason": reason, "records_read_before": records_read,
             "records_in_file_estimated": records_estimated}
        )  # fmt: skip

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def total_read(self) -> int:
        return sum(c.read for c in self.sources.values())

    @property
    def total_written(self) -> int:
        return sum(c.written for c in self.sources.values())

    @property
    def total_skipped(self) -> int:
        return sum(sum(c.skipped.values()) for c in self.sources.values())

    def as_dict(self) -> dict:
        return {
            "strict": self.strict,
            "totals": {"read": self.total_read, "written": self.total_written, "skipped": self.total_skipped},
            "sources": {name: counts.as_dict() for name, counts in sorted(self.sources.items())},
            "ignored": dict(sorted(self.ignored.items())),
            "lost_files": self.lost_files,
            "notes": self.notes,
        }

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=2) + "\n")
