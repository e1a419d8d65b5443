"""Corpus readers on tiny files written here, and on the shipped sets (counts from their SOURCE.md)."""

import gzip
import json

import polars as pl
import pytest

from medstate import MedstateError
from medstate.text.contamination import ContaminationGuard, find_contamination
from medstate.text.corpora import CorpusSource, Document, read_documents


def test_jsonl_gz_fields_ids_and_limit(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    records = [{"pmid": 7, "title": "T1", "abstract": "A1"}, {"pmid": 8, "title": "T2", "abstract": ""}, {}]
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(json.dumps(r) for r in records[:2]) + "\n\n")
    source = CorpusSource("pubmed", str(path), text_fields=["title", "abstract"], id_field="pmid", id_namespace="pmid")
    assert list(read_documents(source)) == [Document("pmid:7", "T1\n\nA1"), Document("pmid:8", "T2")]
    source.limit = 1
    assert len(list(read_documents(source))) == 1


def test_select_keeps_records_with_the_given_field_values(tmp_path):
    path = tmp_path / "notes.jsonl"
    records = [{"id": "a", "split": "train", "text": "x"}, {"id": "b", "split": "test", "text": "y"},
               {"id": "c", "split": "train", "text": "z"}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    train = CorpusSource("n", str(path), id_field="id", select={"split": "train"})
    assert [d.id for d in read_documents(train)] == ["n:a", "n:c"]
    with pytest.raises(MedstateError, match="no field 'ward'"):
        list(read_documents(CorpusSource("n", str(path), id_field="id", select={"ward": "icu"})))
    (tmp_path / "t.txt").write_text("plain")
    with pytest.raises(MedstateError, match="record files"):
        CorpusSource("t", str(tmp_path / "t.txt"), select={"split": "train"})


def test_json_object_keyed_by_id_with_list_fields(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps({"123": {"QUESTION": "Q?", "CONTEXTS": ["c1", "c2"]}}))
    source = CorpusSource("pubmedqa", str(path), text_fields=["QUESTION", "CONTEXTS"], id_namespace="pmid")
    assert list(read_documents(source)) == [Document("pmid:123", "Q?\n\nc1\nc2")]


def test_parquet_text_and_wikitext(tmp_path):
    pl.DataFrame({"id": ["a", "b"], "body": ["first", "second"]}).write_parquet(tmp_path / "d.parquet")
    source = CorpusSource("p", str(tmp_path / "d.parquet"), text_fields=["body"], id_field="id")
    assert [d.id for d in read_documents(source)] == ["p:a", "p:b"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "b.txt").write_text("note b")
    (tmp_path / "notes" / "a.txt").write_text("note a")
    assert [d.text for d in read_documents(CorpusSource("n", str(tmp_path / "notes")))] == ["note a", "note b"]
    raw = " \n = Alpha = \n \n Text one . \n = = Section = = \n More . \n = Beta = \n Two . \n"
    (tmp_path / "wiki.test.raw").write_text(raw)
    documents = list(read_documents(CorpusSource("wikitext", str(tmp_path / "wiki.test.raw"))))
    assert [d.id for d in documents] == ["wikitext:Alpha", "wikitext:Beta"]
    assert "Section" in documents[0].text and "Two" in documents[1].text


def test_reader_errors_are_user_errors(tmp_path):
    with pytest.raises(MedstateError, match="not found"):
        list(read_documents(CorpusSource("x", str(tmp_path / "missing.jsonl"))))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(MedstateError, match=r"bad.jsonl:2: not valid JSON"):
        list(read_documents(CorpusSource("x", str(tmp_path / "bad.jsonl"))))
    (tmp_path / "nofield.jsonl").write_text('{"body": "ok"}\n')
    with pytest.raises(MedstateError, match="no field 'text'"):
        list(read_documents(CorpusSource("x", str(tmp_path / "nofield.jsonl"))))
    with pytest.raises(MedstateError, match="unknown format"):
        CorpusSource("x", "y", format="docx")


def test_shipped_sets(shared_data):
    pubmed = CorpusSource(
        "pubmed",
        str(shared_data / "text-biomed/pubmed-abstracts-ncbi/abstracts.jsonl.gz"),
        text_fields=["title", "abstract"],
        id_field="pmid",
        id_namespace="pmid",
    )
    assert sum(1 for _ in read_documents(pubmed)) == 3990
    wikitext = CorpusSource("wikitext", str(shared_data / "text-general/wikitext-2/wiki.test.raw"))
    raw = (shared_data / "text-general/wikitext-2/wiki.test.raw").read_text().splitlines()
    # article titles; " = Qualified for the next round " is a table legend, not a title
    titles = [line for line in raw if line.startswith(" = ") and line.endswith(" = ") and line[3] != "="]
    assert sum(1 for _ in read_documents(wikitext)) == len(titles) == 62


def test_meds_notes(tmp_path):
    data = tmp_path / "meds" / "data" / "train"
    data.mkdir(parents=True)
    pl.DataFrame(
        {
            "subject_id": [1, 1, 2],
            "time": pl.Series(["2020-01-01 10:00", "2020-01-02 10:00", "2020-01-03 10:00"]).str.to_datetime(),
            "code": ["NOTE//discharge", "LAB//x", "NOTE//radiology"],
            "numeric_value": pl.Series([None, 1.0, None], dtype=pl.Float32),
            "text_value": ["Discharged home.", "n/a", "No acute findings."],
        }
    ).write_parquet(data / "0.parquet")
    documents = list(read_documents(CorpusSource("notes", str(tmp_path / "meds"))))
    assert [d.text for d in documents] == ["Discharged home.", "No acute findings."]
    assert all("2020" not in d.id for d in documents)  # no times (patient data) in ids


def test_contamination_by_id_and_by_overlap():
    held = [
        Document(
            "pmid:1",
            "We studied whether statins reduce mortality in patients with sepsis admitted to intensive "
            "care units across three hospitals between 2001 and 2010 and found no effect at all.",
        ),
        Document(
            "wikitext:Robert",
            "Robert Boulter is an English film , television and theatre actor . He had a "
            "guest @-@ starring role on the television series The Bill in 2000 .",
        ),
    ]
    guard = ContaminationGuard(held, n=8, min_overlap=0.5)
    boilerplate = "This is an open access article distributed under the terms of the Creative Commons licence"
    training = [
        Document("pmid:1", "a different text with the same PMID"),
        Document(
            "wiki:9",
            "Intro. Robert Boulter is an English film, television and theatre actor. He had a guest-"
            "starring role on the television series The Bill in 2000. Later life.",
        ),
        Document(
            "pmid:2", "Statins reduce mortality in patients with sepsis admitted to intensive care. " + boilerplate
        ),
        Document("pmid:3", "Unrelated text about kidney stones and diet. " + boilerplate),
    ]
    kept = [d.id for d in training if guard.match(d) is None]
    assert kept == ["pmid:2", "pmid:3"]  # pmid:2 shares 9 words in a row with pmid:1: a few 8-grams, under half
    assert guard.match(training[0]) == ("id", "pmid:1")
    assert guard.match(training[1]) == ("ngram", "wikitext:Robert")


def test_contamination_report_over_sources(tmp_path):
    path = tmp_path / "train.jsonl"
    records = [(1, "x"), (2, "y"), (4, " \n "), (3, "z"), (5, "")]  # two documents without text: skipped, counted
    path.write_text("\n".join(json.dumps({"pmid": p, "text": t}) for p, t in records))
    source = CorpusSource("pubmed", str(path), id_field="pmid", id_namespace="pmid")
    report = find_contamination([source], ContaminationGuard([Document("pmid:2", "q")]))
    assert report.to_dict() == {
        "scanned": {"pubmed": 3},
        "empty": {"pubmed": 2},
        "removed": {"pubmed": {"id": 1}},
        "documents": [{"source": "pubmed", "id": "pmid:2", "matches": "pmid:2"}],
    }
    assert report.excluded() == {"pubmed": {"pmid:2"}}
