"""NCBI disease corpus: the PubTator reader on a fixture (composite mentions), and the coding dataset on the official
files with its labels recomputed here from the raw annotation lines."""

import gzip
import json

import pytest
import yaml

from medstate import MedstateError
from medstate.text.notes.classify_run import read_criteria, read_labelled
from medstate.text.notes.coding import read_pubtator, write_ncbi_disease

FIXTURE = (
    "10192393|t|A common human skin tumour is caused by mutations.\n"
    "10192393|a|Colon cancers and APC are discussed.\n"
    "10192393\t15\t26\tskin tumour\tDiseaseClass\tD012878\n"
    "10192393\t51\t64\tColon cancers\tDiseaseClass\tD003110|D009369\n"
    "\n"
    "20000001|t|Breast and ovarian cancer.\n"
    "20000001|a|Nothing else.\n"
    "20000001\t0\t25\tBreast and ovarian cancer\tCompositeMention\tD001943+D010051\n"
)


def test_pubtator_reader(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(FIXTURE)
    first, second = read_pubtator(path)
    assert first.pmid == "10192393" and first.text.startswith("A common human skin tumour")
    assert first.text[15:26] == "skin tumour"  # offsets count from the title's start
    assert [c for _, c in first.mentions] == ["D012878", "D003110", "D009369"]
    assert [c for _, c in second.mentions] == ["D001943", "D010051"]
    path.write_text(FIXTURE.replace("20000001\t0", "20000002\t0"))
    with pytest.raises(MedstateError, match=r"corpus\.txt:8"):
        read_pubtator(path)


def test_ncbi_disease_dataset(shared_data, tmp_path):
    folder = shared_data / "ncbi-disease-corpus"
    out = write_ncbi_disease(folder, tmp_path / "ncbi", top=10)
    criteria = read_criteria(out / "criteria.yaml")
    documents = read_labelled(out / "dataset.jsonl", criteria)
    counts = {s: sum(d.split == s for d in documents) for s in ("train", "tuning", "test")}
    assert counts == {"train": 593, "tuning": 100, "test": 100}  # the official split (SOURCE.md)
    # labels recomputed from the raw annotation lines
    raw = {}
    for name in ("NCBItrainset", "NCBIdevelopset", "NCBItestset"):
        with gzip.open(folder / f"{name}_corpus.txt.gz", "rt") as handle:
            for line in handle:
                fields = line.rstrip("\n").split("\t")
                if len(fields) == 6:
                    raw.setdefault(fields[0], set()).update(fields[5].replace("+", "|").split("|"))
    for document in documents:
        for criterion in criteria:
            assert document.labels[criterion.name] == (criterion.name in raw.get(document.id, set()))
    train_frequency = sorted((sum(c.name in raw.get(d.id, set()) for d in documents if d.split == "train")
                              for c in criteria), reverse=True)  # fmt: skip
    assert train_frequency == [sum(c.name in raw.get(d.id, set()) for d in documents if d.split == "train")
                               for c in criteria]  # fmt: skip
    assert yaml.safe_load((out / "criteria.yaml").read_text())["criteria"][0]["question"].startswith("Does the")
    assert json.loads((out / "dataset.jsonl").read_text().splitlines()[0])["subject"]
