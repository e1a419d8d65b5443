"""Longitudinal note documents: the readers on fixtures in the exact MIMIC-III, MIMIC-IV-Note and n2c2 2018 schemas,
MEDS notes from the Synthea FHIR demo, time order and headers, the `until` cut, and chunking that loses no text."""

import csv
import datetime as dt
import gzip
import json
from collections import Counter

import polars as pl
import pytest

from medstate import MedstateError
from medstate.text.notes.documents import (
    build_documents,
    read_meds_notes,
    read_mimic3_notes,
    read_mimic4_notes,
    read_n2c2_2018,
    unusable_notes,
    write_documents,
)
from medstate.text.notes.splits import DEFAULT_SPLITS
from medstate.text.packing import pieces_of

MIMIC3_HEADER = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME", "CATEGORY", "DESCRIPTION",
                 "CGID", "ISERROR", "TEXT"]  # fmt: skip


@pytest.fixture
def mimic3(tmp_path):
    path = tmp_path / "NOTEEVENTS.csv.gz"
    rows = [
        [1, 7, 100, "2150-01-02", "", "", "Discharge summary", "Report", "", "",
         "Admission Date:  [**2150-1-1**]\nName: [**Known lastname 123**], seen by Dr. [**First Name (Titles) **]"],
        [2, 7, 100, "2150-01-01", "2150-01-01 08:30:00", "", "Nursing", "Generic", "1", "", "Pt stable, \"quoted\""],
        [3, 7, 100, "2150-01-01", "2150-01-01 09:00:00", "", "Nursing", "Generic", "1", "1", "written in error"],
        [4, 7, 200, "2152-06-01", "2152-06-01 10:00:00", "", "Radiology", "CHEST", "", "", "No acute process."],
        [5, 8, "", "2151-03-03", "", "", "ECG", "Report", "", "", "Sinus rhythm."],
    ]  # fmt: skip
    with gzip.open(path, "wt", newline="") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_NONNUMERIC)
        writer.writerow(MIMIC3_HEADER)
        writer.writerows(rows)
    return path


def test_mimic3_reader(mimic3):
    notes = read_mimic3_notes(mimic3)
    assert notes["note_id"].to_list() == ["1", "2", "4", "5"]  # ROW_ID 3 is flagged ISERROR
    times = dict(zip(notes["note_id"], notes["time"]))
    assert times["2"] == dt.datetime(2150, 1, 1, 8, 30)
    # known only by its day: the end of that day
    assert times["1"] == dt.datetime(2150, 1, 2, 23, 59, 59, 999999)
    assert notes.filter(pl.col("note_id") == "5")["admission"].to_list() == [None]
    assert 'Pt stable, "quoted"' in notes["text"].to_list()


def test_documents_in_time_order_with_headers_and_deid_tags_removed(mimic3):
    notes = read_mimic3_notes(mimic3)
    (document, other) = build_documents(notes)
    assert (document.subject_id, document.notes, other.subject_id) == ("7", 3, "8")
    assert document.text == (
        '2150-01-01 -- Nursing note --\nPt stable, "quoted"\n\n'
        "2150-01-02 -- Discharge summary note --\nAdmission Date:  \nName: , seen by Dr.\n\n"
        "2152-06-01 -- Radiology note --\nNo acute process."
    )
    kept = build_documents(notes, clean_deid=False)[0].text
    assert "[**Known lastname 123**]" in kept
    by_admission = build_documents(notes, by="admission")
    assert [(d.id, d.notes) for d in by_admission] == [("7/100", 2), ("7/200", 1)]  # subject 8's note has no admission


def test_until_never_lets_a_later_note_in(mimic3):
    notes = read_mimic3_notes(mimic3)
    cut = dt.datetime(2150, 1, 2, 12, 0)  # the discharge summary is dated that day, time unknown: not yet
    (document,) = build_documents(notes, until={"7": cut})
    assert document.notes == 1 and document.last <= cut
    for until in [dt.datetime(2150, 1, 1, 8, 29), dt.datetime(2150, 1, 3), dt.datetime(2153, 1, 1)]:
        for document in build_documents(notes, until=until):
            written = notes.filter((pl.col("subject_id") == document.subject_id) & (pl.col("time") <= until))
            assert document.notes == written.height and document.last <= until
    with pytest.raises(MedstateError):
        build_documents(notes, by="visit")


def test_mimic4_reader(tmp_path):
    header = ["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime", "storetime", "text"]
    discharge, radiology = tmp_path / "discharge.csv.gz", tmp_path / "radiology.csv.gz"
    for path, rows in [
        (discharge, [["10000032-DS-21", 10000032, 22595853, "DS", 21, "2180-05-07 00:00:00", "", "Name: ___\nSex: F"]]),
        (radiology, [["10000032-RR-14", 10000032, 22595853, "RR", 14, "2180-05-06 21:19:00", "", "CXR: clear."],
                     ["10000032-RR-15", 10000032, 22595853, "RR", 15, "2180-05-06 22:00:00", "", "  \n "],
                     ["10000032-RR-16", 10000032, 22595853, "RR", 16, "", "", "No time."]]),
    ]:  # fmt: skip
        with gzip.open(path, "wt", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
    notes = read_mimic4_notes(discharge, radiology)
    assert notes.height == 4  # readers keep every row; documents leave out, and count, what cannot be placed
    assert unusable_notes(notes) == {"without a subject": 0, "without a time": 1, "without text": 1}
    with pytest.warns(UserWarning, match=r"2 of 4 notes left out \(1 without a time, 1 without text\)"):
        (document,) = build_documents(notes, by="admission")
    assert document.notes == 2
    assert document.id == "10000032/22595853" and document.text.startswith("2180-05-06 -- Radiology note --\nCXR")
    with pytest.raises(MedstateError, match="MIMIC-IV-Note"):
        read_mimic4_notes(tmp_path / "discharge.csv.gz", _write(tmp_path / "wrong.csv", "a,b\n1,2\n"))


def _write(path, text):
    path.write_text(text)
    return path


def test_n2c2_2018_reader(tmp_path):
    text = (
        "\n\n\nRecord date: 2069-04-07\n\nGILBERT, JOSEPH\nHbA1c 7.2, on metformin.\n\n"
        "****************************************************************************************************\n"
        "Record date: 2070-01-02\n\nFollow-up: creatinine 1.9; MI in 2068.\n"
    )
    tags = '<ABDOMINAL met="not met" />\n<CREATININE met="met" />\n<MI-6MOS met="not met" />'
    (tmp_path / "100.xml").write_text(
        f'<?xml version="1.0" encoding="UTF-8" ?>\n<PatientMatching>\n<TEXT><![CDATA[{text}]]></TEXT>\n'
        f"<TAGS>\n{tags}\n</TAGS>\n</PatientMatching>\n"
    )
    (patient,) = read_n2c2_2018(tmp_path)
    assert patient.labels == {"ABDOMINAL": False, "CREATININE": True, "MI-6MOS": False}
    assert patient.notes["time"].dt.date().to_list() == [dt.date(2069, 4, 7), dt.date(2070, 1, 2)]
    assert patient.notes["text"][0].startswith("Record date: 2069-04-07") and "metformin" in patient.notes["text"][0]
    assert not patient.notes["text"][0].rstrip().endswith("*")
    (document,) = build_documents(patient.notes)
    assert document.notes == 2 and "creatinine 1.9" in document.text
    (tmp_path / "101.xml").write_text('<PatientMatching><TEXT>x</TEXT><TAGS><A met="maybe"/></TAGS></PatientMatching>')
    with pytest.raises(MedstateError, match=r"101\.xml"):
        read_n2c2_2018(tmp_path)


def test_meds_notes_from_synthea_fhir(synthea_bulk_meds, tmp_path):
    meds = synthea_bulk_meds.summary.output
    notes = read_meds_notes(meds)
    events = pl.read_parquet(list((meds / "data").rglob("*.parquet")))
    expected = events.filter(pl.col("code").str.starts_with("NOTE//") & pl.col("text_value").is_not_null())
    assert notes.height == expected.height == 1215  # SOURCE.md: 1,215 DocumentReference visit notes
    assert set(notes["subject_id"]) == {str(s) for s in expected["subject_id"].unique()}
    documents = build_documents(notes)
    assert sum(d.notes for d in documents) == notes.height
    assert all(d.first <= d.last for d in documents)
    assert documents[0].text.split("\n")[0].endswith("note --")
    # per admission, with each patient's split: a patient's admissions all land in one split
    path = write_documents(build_documents(notes, by="admission"), tmp_path / "d.jsonl", DEFAULT_SPLITS, seed=3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    split_of = {}
    assert all(split_of.setdefault(r["subject_id"], r["split"]) == r["split"] for r in records)
    assert sorted(Counter(split_of.values()).values()) == [2, 3, 8]  # 13 patients: 60 / 20 / 20%


def test_chunks_concatenate_back_to_the_document(small_tokenizer):
    text = " ".join(f"note {i}: the patient was given aspirin for chest pain" for i in range(300))
    ids = small_tokenizer.encode(text)
    for length in (1, 7, 64, len(ids), len(ids) + 5):
        pieces = pieces_of(ids, length)
        assert [t for piece in pieces for t in piece] == ids
        assert all(0 < len(piece) <= length for piece in pieces)
        assert len(pieces) == -(-len(ids) // length)
    assert small_tokenizer.decode([t for piece in pieces_of(ids, 50) for t in piece]) == text
    with pytest.raises(MedstateError):
        pieces_of(ids, 0)


def test_cohort_labels_from_structured_data_at_each_time(synthea_bulk_meds, tmp_path):
    from medstate.text.notes.cohort import CohortConfig, CohortCriterion, build_cohort

    meds = synthea_bulk_meds.summary.output
    criteria = [
        CohortCriterion("prediabetes", "Prediabetes?", codes="^DIAGNOSIS//SNOMED//15777000$"),
        CohortCriterion("lisinopril", "Lisinopril?", codes="^MEDICATION//.*RXNORM//314076$"),
        CohortCriterion("age_40", "At least 40?", min_age=40),
    ]
    documents = build_cohort(CohortConfig(str(meds), criteria, samples_per_subject=3))
    events = pl.read_parquet(list((meds / "data").rglob("*.parquet"))).with_columns(
        pl.col("subject_id").cast(pl.String)
    )
    splits = {}
    for document in documents:
        subject, _, stamp = document.id.partition("@")
        time = dt.datetime.fromisoformat(stamp)
        mine = events.filter((pl.col("subject_id") == subject) & (pl.col("time") <= time))
        # labels recomputed here from the raw events, never from the notes
        assert document.labels["prediabetes"] == (mine["code"] == "DIAGNOSIS//SNOMED//15777000").any()
        assert document.labels["lisinopril"] == mine["code"].str.ends_with("RXNORM//314076").any()
        birth = events.filter((pl.col("subject_id") == subject) & (pl.col("code") == "MEDS_BIRTH"))["time"][0]
        assert document.labels["age_40"] == ((time - birth).days / 365.2425 >= 40)
        # the document holds exactly the notes written up to the prediction time
        notes = mine.filter(pl.col("code").str.starts_with("NOTE//") & pl.col("text_value").is_not_null())
        assert document.text.count(" note --\n") == notes.height
        assert splits.setdefault(subject, document.split) == document.split  # one split per patient
    assert set(splits.values()) == {"train", "tuning", "test"}
    assert any(d.labels["prediabetes"] for d in documents) and not all(d.labels["prediabetes"] for d in documents)


def write_n2c2_patient(folder, name, met):
    from medstate.text.notes.cohort import N2C2_QUESTIONS

    tags = "\n".join(f'<{tag} met="{"met" if tag in met else "not met"}" />' for tag in N2C2_QUESTIONS)
    text = f"\nRecord date: 2070-01-0{len(name) % 9 + 1}\n\nPatient {name}: notes.\n"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.xml").write_text(
        f"<?xml version='1.0'?>\n<PatientMatching><TEXT><![CDATA[{text}]]></TEXT><TAGS>{tags}</TAGS></PatientMatching>"
    )


def test_n2c2_cohort_keeps_the_official_test_split(tmp_path):
    from medstate.text.notes.classify_run import read_criteria, read_labelled
    from medstate.text.notes.cohort import N2C2_QUESTIONS, write_n2c2_cohort

    met = {f"p{i}": {"ENGLISH", "HBA1C"} if i % 2 else {"CREATININE"} for i in range(10)}
    for name in [f"p{i}" for i in range(8)]:
        write_n2c2_patient(tmp_path / "train", name, met[name])
    for name in ("p8", "p9"):
        write_n2c2_patient(tmp_path / "test", name, met[name])
    out = write_n2c2_cohort(tmp_path / "train", tmp_path / "test", tmp_path / "cohort", tuning=0.25)
    criteria = read_criteria(out / "criteria.yaml")
    assert [c.name for c in criteria] == list(N2C2_QUESTIONS)
    documents = read_labelled(out / "dataset.jsonl", criteria)
    splits = {d.id: d.split for d in documents}
    assert sorted(i for i, s in splits.items() if s == "test") == ["test/p8", "test/p9"]
    assert sum(s == "tuning" for s in splits.values()) == 2 and sum(s == "train" for s in splits.values()) == 6
    for document in documents:
        name = document.id.split("/")[1]
        assert {k for k, v in document.labels.items() if v} == met[name]
        assert f"Patient {name}: notes." in document.text


def test_us_core_bundles_give_notes_and_labels_from_their_own_resources(tmp_path, shared_data):
    """The second FHIR producer (Inferno's US Core transaction bundles): DocumentReference text notes become MEDS
    NOTE events and documents, and its Conditions the diagnosis events cohort labels are read from."""
    from medstate.data.convert import convert

    root = shared_data / "synthea-uscore-inferno"
    meds = convert(root, tmp_path / "meds", "fhir").summary.output
    notes = read_meds_notes(meds)
    # SOURCE.md: 19 + 24 text notes (patient 85's advance-directive DocumentReference has no text attachment)
    assert notes.group_by("subject_id").len().sort("len")["len"].to_list() == [19, 24]
    documents = build_documents(notes)
    assert [d.notes for d in sorted(documents, key=lambda d: d.notes)] == [19, 24]
    assert all("# Chief Complaint" in d.text for d in documents)
    # the structured side a cohort labels from: patient 355's prediabetes (SOURCE.md) is a diagnosis event
    events = pl.read_parquet(list((meds / "data").rglob("*.parquet")))
    assert (events["code"] == "DIAGNOSIS//SNOMED//15777000").sum() >= 1
