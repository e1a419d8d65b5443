"""A patient's longitudinal notes as documents (ClinicalMamba's input), from MEDS or MIMIC note tables.

Every reader returns one frame of notes in one schema (`NOTE_SCHEMA`): subject_id, admission (the hospital
admission id, or null), time, category, note_id, text. Readers:

    read_meds_notes(meds_dir)          NOTE events of a MEDS dataset (`text_value`; the data layer writes them from
                                       FHIR DocumentReference); the category is the code after `NOTE//`
    read_mimic3_notes(path)            MIMIC-III NOTEEVENTS.csv[.gz]; rows flagged ISERROR are dropped
    read_mimic4_notes(path, ...)       MIMIC-IV-Note discharge.csv.gz / radiology.csv.gz (any number of files)
    read_n2c2_2018(folder)             n2c2 2018 track 1 (cohort selection) XML: each patient's records, and the
                                       13 criteria labels (met / not met)

A note known only by its day (MIMIC-III CHARTDATE without CHARTTIME, n2c2 "Record date") is placed at the end of
that day, so that a cut at a time t during the day never lets it in early.

`read_notes(path, format)` picks the reader (`auto`: a folder with data/ is MEDS, a folder of .xml is n2c2, a CSV is
told by its header). `build_documents` groups notes per patient or per admission, in time order (ties by note id),
each note opened by a header `"{date} -- {category} note --"` (ClinicalMamba's), with the de-identification brackets
of MIMIC-III (`[**Known lastname 123**]`) removed when asked, and keeps only the notes written at or before `until`
(one time for all, or one per subject). Nothing is cut to a context length here: pretraining splits each document's
token ids into pieces of at most the row length that concatenate back to the whole document
(`text.packing.pieces_of`; ClinicalMamba's preprocessing kept only the last chunk of a long admission).
"""

from __future__ import annotations

import datetime as dt
import re
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from medstate.errors import MedstateError
from medstate.text.notes.splits import assign_splits

NOTE_SCHEMA = {
    "subject_id": pl.String,
    "admission": pl.String,
    "time": pl.Datetime("us"),
    "category": pl.String,
    "note_id": pl.String,
    "text": pl.String,
}
DEID_TAG = re.compile(r"\[\*\*.*?\*\*\]", re.DOTALL)
END_OF_DAY = dt.timedelta(days=1) - dt.timedelta(microseconds=1)


def _finish(frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    frame = frame.lazy().select([pl.col(name).cast(dtype) for name, dtype in NOTE_SCHEMA.items()])
    # an empty id, quoted or not, is no id
    frame = frame.with_columns(
        [pl.when(pl.col(c).str.strip_chars() != "").then(pl.col(c)) for c in ("subject_id", "admission", "note_id")]
    )
    return frame.collect()


def _usable() -> pl.Expr:
    return (
        pl.col("subject_id").is_not_null()
        & pl.col("time").is_not_null()
        & pl.col("text").is_not_null()
        & (pl.col("text").str.strip_chars() != "")
    )


def unusable_notes(notes: pl.DataFrame) -> dict[str, int]:
    """How many notes `build_documents` leaves out, by reason (a note may have several): no subject, no time (it
    cannot be placed in time order or cut at a prediction time), no text (null or only white space)."""
    return {
        "without a subject": notes["subject_id"].null_count(),
        "without a time": notes["time"].null_count(),
        "without text": notes.filter(pl.col("text").is_null() | (pl.col("text").str.strip_chars() == "")).height,
    }


def _require(path: Path, frame: pl.LazyFrame, columns: Sequence[str], what: str) -> None:
    names = frame.collect_schema().names()
    missing = [c for c in columns if c not in names]
    if missing:
        raise MedstateError(f"{path}: not a {what} file (no column(s) {', '.join(missing)}; has {', '.join(names)})")


def _csv(path: str | Path) -> tuple[Path, pl.LazyFrame]:
    path = Path(path)
    if not path.is_file():
        raise MedstateError(f"{path} not found")
    # every column as text: ids stay exact, dates are parsed below with their own formats
    return path, pl.scan_csv(path, infer_schema=False)


def read_mimic3_notes(path: str | Path) -> pl.DataFrame:
    """MIMIC-III NOTEEVENTS: CHARTTIME, else the end of CHARTDATE; CATEGORY; HADM_ID as the admission."""
    path, frame = _csv(path)
    columns = ("ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "CATEGORY", "ISERROR", "TEXT")
    _require(path, frame, columns, "MIMIC-III NOTEEVENTS")
    day = pl.col("CHARTDATE").str.to_datetime("%Y-%m-%d", strict=False, time_unit="us")
    time = pl.col("CHARTTIME").str.to_datetime("%Y-%m-%d %H:%M:%S", strict=False, time_unit="us")
    return _finish(
        frame.filter(pl.col("ISERROR").is_null() | (pl.col("ISERROR").str.strip_chars() != "1")).select(
            subject_id=pl.col("SUBJECT_ID"),
            admission=pl.col("HADM_ID"),
            time=pl.coalesce(time, day + END_OF_DAY),
            category=pl.col("CATEGORY").str.strip_chars(),
            note_id=pl.col("ROW_ID"),
            text=pl.col("TEXT"),
        )
    )


MIMIC4_TYPES = {"DS": "Discharge summary", "RR": "Radiology", "AR": "Radiology addendum", "AD": "Discharge addendum"}


def read_mimic4_notes(*paths: str | Path) -> pl.DataFrame:
    """MIMIC-IV-Note discharge / radiology tables: charttime; note_type (DS, RR, …) spelled out; hadm_id."""
    frames = []
    for given in paths:
        path, frame = _csv(given)
        _require(path, frame, ("note_id", "subject_id", "hadm_id", "note_type", "charttime", "text"), "MIMIC-IV-Note")
        frames.append(
            frame.select(
                subject_id=pl.col("subject_id"),
                admission=pl.col("hadm_id"),
                time=pl.col("charttime").str.to_datetime("%Y-%m-%d %H:%M:%S", strict=False, time_unit="us"),
                category=pl.col("note_type").replace(MIMIC4_TYPES),
                note_id=pl.col("note_id"),
                text=pl.col("text"),
            )
        )
    if not frames:
        raise MedstateError("read_mimic4_notes needs at least one file")
    return _finish(pl.concat(frames))


def read_meds_notes(root: str | Path, note_codes: str = "^NOTE//") -> pl.DataFrame:
    """NOTE events with a text_value; the admission is the event's `encounter_id` where the dataset has one."""
    from medstate.data.meds import scan_meds
    from medstate.loading import compile_pattern

    pattern = compile_pattern(note_codes, "note_codes")
    events = scan_meds(root).filter(pl.col("code").str.contains(pattern.pattern) & pl.col("text_value").is_not_null())
    has_encounter = "encounter_id" in events.collect_schema().names()
    numbered = events.with_row_index("_row")
    return _finish(
        numbered.select(
            subject_id=pl.col("subject_id").cast(pl.String),
            admission=pl.col("encounter_id").cast(pl.String) if has_encounter else pl.lit(None, pl.String),
            time=pl.col("time"),
            category=pl.col("code").str.replace(pattern.pattern, "").str.replace_all("//", " "),
            note_id=pl.col("_row").cast(pl.String),
            text=pl.col("text_value"),
        )
    )


RECORD_DATE = re.compile(r"^\s*Record date:\s*(\d{4}-\d{2}-\d{2})", re.MULTILINE)


@dataclass(frozen=True)
class N2C2Patient:
    subject_id: str
    notes: pl.DataFrame  # NOTE_SCHEMA, one row per record
    labels: dict[str, bool]  # criterion tag (e.g. ABDOMINAL) -> met


def read_n2c2_2018(folder: str | Path) -> list[N2C2Patient]:
    """n2c2 2018 track 1: one XML file per patient, `<TEXT>` holding records that each begin with a "Record date:"
    line, `<TAGS>` holding one element per criterion with met="met" or "not met"."""
    folder = Path(folder)
    files = sorted(folder.glob("*.xml")) if folder.is_dir() else []
    if not files:
        raise MedstateError(f"{folder}: no n2c2 2018 .xml files")
    patients = []
    for path in files:
        try:
            root = ElementTree.parse(path).getroot()
        except ElementTree.ParseError as err:
            raise MedstateError(f"{path}: not valid XML ({err})") from None
        text = root.findtext("TEXT")
        if text is None:
            raise MedstateError(f"{path}: no <TEXT> element")
        labels = {}
        for tag in root.find("TAGS") if root.find("TAGS") is not None else []:
            value = tag.get("met")
            if value not in ("met", "not met"):
                raise MedstateError(f"{path}: criterion {tag.tag} has met={value!r}, expected 'met' or 'not met'")
            labels[tag.tag] = value == "met"
        starts = [m.start() for m in RECORD_DATE.finditer(text)]
        if not starts:
            raise MedstateError(f"{path}: no 'Record date:' line in <TEXT>")
        rows = []
        for number, (start, end) in enumerate(zip(starts, [*starts[1:], len(text)])):
            record = text[start:end].strip().strip("*").strip()
            day = dt.datetime.strptime(RECORD_DATE.match(text, start).group(1), "%Y-%m-%d")
            rows.append((path.stem, None, day + END_OF_DAY, "record", f"{path.stem}#{number}", record))
        patients.append(N2C2Patient(path.stem, _finish(pl.DataFrame(rows, schema=NOTE_SCHEMA, orient="row")), labels))
    return patients


@dataclass(frozen=True)
class NoteDocument:
    id: str  # subject id, or subject id/admission
    subject_id: str
    admission: str | None
    text: str
    notes: int
    first: dt.datetime
    last: dt.datetime


def note_header(time: dt.datetime, category: str) -> str:
    return f"{time:%Y-%m-%d} -- {category} note --"


def build_documents(
    notes: pl.DataFrame,
    by: str = "subject",
    until: dt.datetime | Mapping[str, dt.datetime] | None = None,
    clean_deid: bool = True,
) -> list[NoteDocument]:
    """One document per subject (`by="subject"`) or per admission (`by="admission"`; notes without an admission
    are left out), its notes in time order, each under its header, separated by a blank line. With `until`, only
    notes timed at or before it (a mapping gives each subject its own time; subjects not in it are left out). Notes
    with no subject, time or text are left out with a warning that counts them (`unusable_notes`)."""
    if by not in ("subject", "admission"):
        raise MedstateError(f"by must be 'subject' or 'admission', got {by!r}")
    frame = notes.filter(_usable())
    if frame.height < notes.height:
        reasons = ", ".join(f"{n} {why}" for why, n in unusable_notes(notes).items() if n)
        warnings.warn(f"{notes.height - frame.height} of {notes.height} notes left out ({reasons})", stacklevel=2)
    if isinstance(until, Mapping):
        cut = pl.DataFrame({"subject_id": list(until), "_until": list(until.values())}, schema_overrides={
            "subject_id": pl.String, "_until": pl.Datetime("us")})  # fmt: skip
        frame = frame.join(cut, on="subject_id").filter(pl.col("time") <= pl.col("_until")).drop("_until")
    elif until is not None:
        frame = frame.filter(pl.col("time") <= until)
    keys = ["subject_id"] if by == "subject" else ["subject_id", "admission"]
    if by == "admission":
        frame = frame.filter(pl.col("admission").is_not_null())
    frame = frame.sort([*keys, "time", "note_id"])
    documents = []
    for key, group in frame.group_by(keys, maintain_order=True):
        parts = []
        for time, category, text in group.select("time", "category", "text").iter_rows():
            body = DEID_TAG.sub("", text) if clean_deid else text
            parts.append(f"{note_header(time, category)}\n{body.strip()}")
        subject, admission = key[0], (key[1] if by == "admission" else None)
        documents.append(
            NoteDocument(
                id=subject if admission is None else f"{subject}/{admission}",
                subject_id=subject,
                admission=admission,
                text="\n\n".join(parts),
                notes=group.height,
                first=group["time"].min(),
                last=group["time"].max(),
            )
        )
    return documents


NOTE_FORMATS = ("auto", "meds", "mimic3", "mimic4", "n2c2")


def read_notes(path: str | Path, format: str = "auto") -> pl.DataFrame:
    """Notes in NOTE_SCHEMA from any of the supported sources (see the module's docstring)."""
    path = Path(path)
    if format not in NOTE_FORMATS:
        raise MedstateError(f"unknown notes format {format!r}; choose one of {', '.join(NOTE_FORMATS)}")
    if format == "auto":
        format = _guess_format(path)
    if format == "meds":
        return read_meds_notes(path)
    if format == "mimic3":
        return read_mimic3_notes(path)
    if format == "mimic4":
        return read_mimic4_notes(path)
    return pl.concat([patient.notes for patient in read_n2c2_2018(path)])


def _guess_format(path: Path) -> str:
    if path.is_dir():
        if (path / "data").is_dir():
            return "meds"
        if any(path.glob("*.xml")):
            return "n2c2"
        raise MedstateError(f"{path}: a folder that is neither a MEDS dataset nor n2c2 XML files; set the format")
    if not path.is_file():
        raise MedstateError(f"{path} not found")
    names = _csv(path)[1].collect_schema().names()
    if "ROW_ID" in names and "TEXT" in names:
        return "mimic3"
    if "note_id" in names and "text" in names:
        return "mimic4"
    raise MedstateError(f"{path}: not a MIMIC-III NOTEEVENTS or MIMIC-IV-Note table (columns {', '.join(names)})")


def write_documents(
    documents: Sequence[NoteDocument], path: str | Path, splits: Mapping[str, float] | None = None, seed: int = 0
) -> Path:
    """JSON Lines, one document per line (id, subject_id, admission, notes, first, last, text): a corpus that
    `medstate text pretrain` reads with `text_fields: [text]` and `id_field: id`. With `splits` (train / tuning /
    test shares), each document also gets its patient's `split` (seeded, by patient, as cohorts are split), which a
    corpus selects with `select: {split: train}`."""
    import json

    split_of = assign_splits(sorted({d.subject_id for d in documents}), splits, seed) if splits else {}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for d in documents:
            record = {"id": d.id, "subject_id": d.subject_id, "admission": d.admission, "notes": d.notes,
                      "first": d.first.isoformat(), "last": d.last.isoformat(), "text": d.text}  # fmt: skip
            if split_of:
                record["split"] = split_of[d.subject_id]
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
