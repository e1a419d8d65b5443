"""How the shipped text demo data was cut from the project's shared data (run from the repository root with
../shared beside it): `python data/demo/text/build.py`. Texts are copied unchanged; only records are selected."""

import gzip
import json
import shutil
from pathlib import Path

SHARED = Path("../shared/data")
OUT = Path(__file__).resolve().parent


def write_jsonl(path: Path, records: list[dict]) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as handle:  # mtime 0: the same bytes on every run
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())


def main() -> None:
    with gzip.open(SHARED / "text-biomed/pubmed-abstracts-ncbi/abstracts.jsonl.gz", "rt") as handle:
        clear = [r for r in map(json.loads, handle) if r["licence_tier"] == "clear"]
    keep = ("pmid", "title", "abstract", "licence_basis")
    write_jsonl(OUT / "pubmed-train.jsonl.gz", [{k: r[k] for k in keep} for r in clear[:1600]])
    write_jsonl(OUT / "pubmed-heldout.jsonl.gz", [{k: r[k] for k in keep} for r in clear[1600:1800]])
    with open(SHARED / "text-general/c4-en-sample-1000/c4_sample.jsonl") as handle:
        write_jsonl(OUT / "c4-train.jsonl.gz", [json.loads(line) for line, _ in zip(handle, range(400))])
    with open(SHARED / "text-general/wikipedia-enwiki-gensim-sample/enwiki_sample_106_articles.plain.jsonl") as handle:
        write_jsonl(OUT / "wikipedia-train.jsonl.gz", [json.loads(line) for line, _ in zip(handle, range(40))])
    with (
        open(SHARED / "text-general/wikitext-2/wiki.test.raw", "rb") as source,
        gzip.GzipFile(OUT / "wikitext-2-test.raw.gz", "wb", mtime=0) as target,
    ):
        shutil.copyfileobj(source, target)
    (OUT / "pubmedqa").mkdir(exist_ok=True)
    for name in ("ori_pqal.json.gz", "test_ground_truth.json", "LICENSE"):
        shutil.copy(SHARED / "pubmedqa-pqal" / name, OUT / "pubmedqa" / name)
    for name in ("LICENSE", "LICENSE-CC-BY-4.0.txt", "NOTICE-BC5CDR.txt"):
        shutil.copy(SHARED / "text-biomed/pubmed-abstracts-ncbi" / name, OUT / f"pubmed-{name}")
    (OUT / "aci-bench").mkdir(exist_ok=True)  # ACI-Bench's train / valid splits and test set 1, files unchanged
    for name in ("train.csv.gz", "valid.csv.gz", "clinicalnlp_taskB_test1.csv.gz"):
        shutil.copy(SHARED / "aci-bench/challenge_data" / name, OUT / "aci-bench" / name)


if __name__ == "__main__":
    main()
