"""Cohort criteria over a patient's notes, labelled from structured data (never from the notes).

A cohort YAML names a MEDS dataset that has NOTE events (e.g. Synthea FHIR converted by `medstate data convert`) and
the criteria:

    meds: synthea-meds
    samples_per_subject: 4            # prediction times per patient: notes spread evenly over their history
    splits: {train: 0.6, tuning: 0.2, test: 0.2}   # by patient
    criteria:
      - {name: hypertension, question: "Has the patient been diagnosed with hypertension?",
         codes: "^DIAGNOSIS//SNOMED//(59621000|38341003)$"}
      - {name: age_65, question: "Is the patient 65 years old or older?", min_age: 65}

At each prediction time t (the time of one of the patient's notes), the document is the patient's notes written at
or before t (`notes.build_documents(until=…)`), and a criterion is met when an event whose code matches `codes` is
timed at or before t, or when the patient is at least `min_age` years old at t (from MEDS_BIRTH). The output is the
dataset JSONL and criteria YAML that `medstate text classify` reads.

`write_n2c2_cohort` makes the same files from n2c2 2018 track 1 (cohort selection for clinical trials): each
patient's records as one document, its 13 criteria tags (met / not met) as labels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from medstate.errors import MedstateError
from medstate.loading import PATH, compile_pattern, load_settings
from medstate.text.notes.documents import build_documents, read_meds_notes, read_n2c2_2018
from medstate.text.notes.splits import DEFAULT_SPLITS, SPLITS, LabelledDocument, assign_splits

DAYS_PER_YEAR = 365.2425


@dataclass
class CohortCriterion:
    name: str
    question: str
    codes: str | None = None  # regex over MEDS codes: met once such an event has happened
    min_age: float | None = None  # met from this age (years) on

    def __post_init__(self) -> None:
        if (self.codes is None) == (self.min_age is None):
            raise MedstateError(f"criterion {self.name!r}: give exactly one of codes and min_age")


@dataclass
class CohortConfig:
    meds: str = field(metadata=PATH)
    criteria: list[CohortCriterion]
    samples_per_subject: int = 4
    splits: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLITS))
    seed: int = 0
    clean_deid: bool = True

    def __post_init__(self) -> None:
        if set(self.splits) != set(SPLITS) or not all(v > 0 for v in self.splits.values()):
            raise MedstateError(f"splits must give a positive share to each of {', '.join(SPLITS)}")
        if self.samples_per_subject < 1:
            raise MedstateError("samples_per_subject must be at least 1")

    @classmethod
    def read(cls, path: str | Path, overrides: dict | None = None) -> CohortConfig:
        """A YAML file (relative paths in it are relative to its folder) with typed overrides (`load_settings`)."""
        return load_settings(cls, path, overrides, "cohort config")


def _labels(events: pl.DataFrame, births: dict[str, object], criteria: list[CohortCriterion], subject: str, time):
    seen = events.filter((pl.col("subject_id") == subject) & (pl.col("time") <= time))["code"]
    labels = {}
    for criterion in criteria:
        if criterion.codes is not None:
            pattern = compile_pattern(criterion.codes, f"criterion {criterion.name}: codes")
            labels[criterion.name] = bool(seen.str.contains(pattern.pattern).any())
        else:
            birth = births.get(subject)
            if birth is None:
                raise MedstateError(f"subject {subject} has no MEDS_BIRTH event: cannot tell their age")
            labels[criterion.name] = (time - birth).days / DAYS_PER_YEAR >= criterion.min_age
    return labels


def build_cohort(config: CohortConfig) -> list[LabelledDocument]:
    from medstate.data.meds import scan_meds

    notes = read_meds_notes(config.meds)
    if notes.is_empty():
        raise MedstateError(f"{config.meds} has no NOTE events with text")
    structured = (
        scan_meds(config.meds)
        .filter(~pl.col("code").str.starts_with("NOTE//") & pl.col("time").is_not_null())
        .select(pl.col("subject_id").cast(pl.String), "time", "code")
        .collect()
    )
    births = dict(
        structured.filter(pl.col("code") == "MEDS_BIRTH").group_by("subject_id").agg(pl.col("time").min()).iter_rows()
    )
    subjects = sorted(notes["subject_id"].unique().to_list())
    split_of = assign_splits(subjects, config.splits, config.seed)
    documents = []
    for subject in subjects:
        times = notes.filter(pl.col("subject_id") == subject)["time"].sort().to_list()
        picks = sorted({int(i) for i in np.linspace(0, len(times) - 1, config.samples_per_subject).round()})
        for pick in picks:
            time = times[pick]
            (document,) = build_documents(notes, until={subject: time}, clean_deid=config.clean_deid)
            labels = _labels(structured, births, config.criteria, subject, time)
            documents.append(LabelledDocument(f"{subject}@{time.isoformat()}", subject, split_of[subject],
                                              document.text, labels))  # fmt: skip
    return documents


def write_cohort(config: CohortConfig, out_dir: str | Path) -> Path:
    """dataset.jsonl and criteria.yaml in `out_dir`, for `medstate text classify`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    documents = build_cohort(config)
    with open(out_dir / "dataset.jsonl", "w", encoding="utf-8") as handle:
        for d in documents:
            handle.write(json.dumps(dataclasses.asdict(d), ensure_ascii=False) + "\n")
    criteria = [{"name": c.name, "question": c.question} for c in config.criteria]
    (out_dir / "criteria.yaml").write_text(yaml.safe_dump({"criteria": criteria}, sort_keys=False))
    return out_dir


# The 13 criteria of n2c2 2018 track 1 (cohort selection for clinical trials), by their tags, as questions.
N2C2_QUESTIONS = {
    "ABDOMINAL": "Has the patient had intra-abdominal surgery, a bowel resection or a small bowel obstruction?",
    "ADVANCED-CAD": "Does the patient have advanced cardiovascular disease?",
    "ALCOHOL-ABUSE": "Does the patient currently drink alcohol over the weekly recommended limits?",
    "ASP-FOR-MI": "Does the patient take aspirin to prevent myocardial infarction?",
    "CREATININE": "Has the patient had a serum creatinine above the upper limit of normal?",
    "DIETSUPP-2MOS": "Has the patient taken a dietary supplement other than vitamin D in the past 2 months?",
    "DRUG-ABUSE": "Has the patient abused drugs, now or in the past?",
    "ENGLISH": "Does the patient speak English?",
    "HBA1C": "Has the patient had an HbA1c value between 6.5 and 9.5%?",
    "KETO-1YR": "Has the patient been diagnosed with ketoacidosis in the past year?",
    "MAJOR-DIABETES": "Has the patient had a major diabetes-related complication?",
    "MAKES-DECISIONS": "Does the patient make their own medical decisions?",
    "MI-6MOS": "Has the patient had a myocardial infarction in the past 6 months?",
}


def write_n2c2_cohort(
    train: str | Path, test: str | Path, out_dir: str | Path, tuning: float = 0.2, seed: int = 0
) -> Path:
    """dataset.jsonl and criteria.yaml from n2c2 2018 track 1's train and test folders: each patient's records as one
    document, its 13 tags as labels; a seeded share `tuning` of the training patients forms the tuning split."""
    out_dir = Path(out_dir)
    patients = {"train": read_n2c2_2018(train), "test": read_n2c2_2018(test)}
    order = sorted(
        (p.subject_id for p in patients["train"]),
        key=lambda s: hashlib.blake2b(f"{seed}:{s}".encode(), digest_size=8).digest(),
    )
    held = set(order[: max(1, round(len(order) * tuning))])
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "dataset.jsonl", "w", encoding="utf-8") as handle:
        for source, group in patients.items():
            for patient in group:
                missing = set(N2C2_QUESTIONS) - set(patient.labels)
                if missing:
                    raise MedstateError(f"n2c2 patient {patient.subject_id}: no tag(s) {', '.join(sorted(missing))}")
                split = "tuning" if source == "train" and patient.subject_id in held else source
                (document,) = build_documents(patient.notes)
                labels = {tag: patient.labels[tag] for tag in N2C2_QUESTIONS}
                record = LabelledDocument(f"{source}/{patient.subject_id}", f"{source}/{patient.subject_id}", split,
                                          document.text, labels)  # fmt: skip
                handle.write(json.dumps(dataclasses.asdict(record), ensure_ascii=False) + "\n")
    criteria = [{"name": tag, "question": question} for tag, question in N2C2_QUESTIONS.items()]
    (out_dir / "criteria.yaml").write_text(yaml.safe_dump({"criteria": criteria}, sort_keys=False))
    return out_dir
