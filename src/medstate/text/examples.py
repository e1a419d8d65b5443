"""Prompt → response examples, and the records of a file written into them through templates over each record's
fields (`"Dialogue:\\n{dialogue}\\nNote:"` → `" {note}"`): what supervised finetuning trains on and what generation
answers and scores."""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from medstate.errors import MedstateError
from medstate.text.corpora import read_records


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    response: str


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def record_examples(
    name: str, path: str | Path, prompt: str, response: str, id_field: str | None = None
) -> list[Example]:
    """One example per record of a JSON Lines / JSON / CSV / Parquet file; a record lacking a field that a template
    names is an error naming the record."""
    examples = []
    for number, (where, record) in enumerate(read_records(path), 1):
        missing = [f for f in template_fields(prompt) + template_fields(response) if f not in record]
        if missing:
            raise MedstateError(f"{where}: no field(s) {', '.join(missing)} for task {name!r}")
        key = record.get(id_field) if id_field else record.get("_key", number)
        examples.append(Example(f"{name}:{key}", prompt.format(**record), response.format(**record)))
    return examples
