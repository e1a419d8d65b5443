"""ICD-coding-style multi-label classification on the NCBI disease corpus (Doğan et al. 2014): 793 PubMed abstracts
whose disease mentions carry MeSH / OMIM concept ids, in the official train / dev / test files (PubTator format:
`pmid|t|title`, `pmid|a|abstract`, then one tab-separated line per mention: pmid, start, end, text, type, concept
ids joined by `|` or `+` for composite mentions).

A document's labels are the concepts mentioned in it; the `top` concepts most frequent over the training
abstracts become the criteria, each asked as "Does the abstract mention <its most frequent spelled-out mention>?". The
train file is the train split, dev the tuning split, test the test split; the output is the dataset JSONL and
criteria YAML that `medstate text classify` reads.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from medstate.errors import MedstateError

NCBI_FILES = {
    "train": "NCBItrainset_corpus.txt",
    "tuning": "NCBIdevelopset_corpus.txt",
    "test": "NCBItestset_corpus.txt",
}


@dataclass(frozen=True)
class Abstract:
    pmid: str
    text: str  # title and abstract, as the corpus gives them (offsets count from the title's start)
    mentions: tuple[tuple[str, str], ...]  # (mention text, concept id)


def read_pubtator(path: str | Path) -> list[Abstract]:
    path = Path(path)
    if not path.is_file():
        raise MedstateError(f"{path} not found")
    opener = gzip.open if path.name.endswith(".gz") else open
    abstracts, current = [], None
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if "|t|" in line[:20] or "|a|" in line[:20]:
                pmid, kind, text = line.split("|", 2)
                if kind == "t":
                    current = {"pmid": pmid, "title": text, "abstract": "", "mentions": []}
                    abstracts.append(current)
                elif current is None or current["pmid"] != pmid:
                    raise MedstateError(f"{path}:{number}: abstract line for {pmid} without its title line")
                else:
                    current["abstract"] = text
                continue
            fields = line.split("\t")
            if len(fields) != 6 or current is None or fields[0] != current["pmid"]:
                raise MedstateError(f"{path}:{number}: not a PubTator annotation line of the current abstract")
            for concept in fields[5].replace("+", "|").split("|"):
                if concept.strip():
                    current["mentions"].append((fields[3], concept.strip()))
    return [Abstract(a["pmid"], f"{a['title']} {a['abstract']}", tuple(a["mentions"])) for a in abstracts]


def write_ncbi_disease(folder: str | Path, out_dir: str | Path, top: int = 20) -> Path:
    """dataset.jsonl and criteria.yaml in `out_dir` for the `top` most frequent training concepts."""
    folder, out_dir = Path(folder), Path(out_dir)
    splits = {}
    for split, name in NCBI_FILES.items():
        path = folder / name if (folder / name).is_file() else folder / f"{name}.gz"
        splits[split] = read_pubtator(path)
    frequency = Counter(concept for a in splits["train"] for concept in {c for _, c in a.mentions})
    concepts = [concept for concept, _ in frequency.most_common(top)]
    names = {}
    for concept in concepts:
        texts = Counter(text.lower() for a in splits["train"] for text, c in a.mentions if c == concept)
        # the most frequent spelled-out mention ("duchenne muscular dystrophy", not "dmd"), else the most frequent
        spelled = [text for text, _ in texts.most_common() if " " in text or len(text) > 6]
        names[concept] = spelled[0] if spelled else texts.most_common(1)[0][0]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "dataset.jsonl", "w", encoding="utf-8") as handle:
        for split, abstracts in splits.items():
            for a in abstracts:
                mentioned = {c for _, c in a.mentions}
                record = {"id": a.pmid, "subject": a.pmid, "split": split, "text": a.text,
                          "labels": {concept: concept in mentioned for concept in concepts}}  # fmt: skip
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    criteria = [{"name": c, "question": f"Does the abstract mention {names[c]}?"} for c in concepts]
    (out_dir / "criteria.yaml").write_text(yaml.safe_dump({"criteria": criteria}, sort_keys=False))
    return out_dir
