"""Are two `medstate ehr prepare` outputs the same data? An older whole-cohort output (pretrain.parquet and
finetune.parquet with every input written out) or a sharded one (the token store), against a sharded one: the same
vocabulary and value bins, the same subjects and samples (task, subject, visit, prediction time, label, split) and,
for every one of them, the same tokens (compared as token strings, so an id renumbering would not hide a change) and
the same type, age, time, segment and order arrays.

    python benchmarks/compare_prepared.py OLD_PREPARED NEW_PREPARED

Prints one line per check and exits 1 at the first difference (naming the sample).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

import harness  # noqa: F401  (this folder after the installed packages)
from medstate.ehr.sequences import ARRAYS
from medstate.ehr.store import Samples
from medstate.ehr.vocab import Vocabulary

KEY = {"pretrain": ["subject_id"], "finetune": ["task", "subject_id", "visit_key", "prediction_time"]}
LABELS = ["label", "split"]


def inputs(prepared: Path, kind: str) -> tuple[pl.DataFrame, list[dict]]:
    """The samples of `kind` (their keys, labels) and their arrays, sorted by key, from either layout."""
    old = prepared / f"{kind}.parquet"
    if old.is_file():
        frame = pl.read_parquet(old).with_row_index("_row")
        arrays = frame.select(*ARRAYS).to_dicts()
    else:
        samples = Samples.read(prepared, kind)
        frame, arrays = samples.frame.with_row_index("_row"), samples.arrays
    keep = [c for c in (*KEY[kind], *LABELS) if c in frame.columns]
    frame = frame.select("_row", *keep).sort(KEY[kind])
    return frame, arrays


def main(old_dir: str, new_dir: str) -> int:
    old_dir, new_dir = Path(old_dir), Path(new_dir)
    old_vocab, new_vocab = Vocabulary.load(old_dir / "vocab.json"), Vocabulary.load(new_dir / "vocab.json")
    if old_vocab.tokens != new_vocab.tokens:
        print(f"vocabulary differs: {len(old_vocab)} vs {len(new_vocab)} tokens")
        return 1
    print(f"vocabulary: the same {len(new_vocab):,} tokens")
    if json.loads((old_dir / "value_bins.json").read_text()) != json.loads((new_dir / "value_bins.json").read_text()):
        print("value bins differ")
        return 1
    print("value bins: the same edges")
    for kind in ("pretrain", "finetune"):
        (old, old_arrays), (new, new_arrays) = inputs(old_dir, kind), inputs(new_dir, kind)
        if not old.drop("_row").equals(new.drop("_row")):
            print(f"{kind}: the samples or their labels differ ({len(old)} vs {len(new)} rows)")
            return 1
        for key, i, j in zip(old.select(KEY[kind]).iter_rows(), old["_row"], new["_row"]):
            a, b = old_arrays[i], new_arrays[j]
            if [old_vocab.tokens[t] for t in a["input_ids"]] != [new_vocab.tokens[t] for t in b["input_ids"]]:
                print(f"{kind} {key}: the tokens differ")
                return 1
            for name in ARRAYS[1:]:
                if not np.array_equal(np.asarray(a[name]), np.asarray(b[name])):
                    print(f"{kind} {key}: {name} differs")
                    return 1
        print(f"{kind}: the same {len(new):,} samples, labels and inputs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
