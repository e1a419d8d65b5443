"""Which samples and labels changed between two `medstate ehr prepare` outputs (before/after a labelling change).

python docs/results/ehr-benchmark/compare_labels.py OLD_PREPARED NEW_PREPARED
"""

import sys

import polars as pl

KEY = ["task", "subject_id", "visit_key"]


def main(old_dir: str, new_dir: str) -> None:
    old = pl.read_parquet(f"{old_dir}/labels.parquet").select(*KEY, "split", pl.col("label").alias("old"))
    new = pl.read_parquet(f"{new_dir}/labels.parquet").select(*KEY, "split", pl.col("label").alias("new"))
    both = old.join(new, on=KEY, how="full", coalesce=True, suffix="_new").with_columns(
        pl.coalesce("split", "split_new").alias("split")
    )
    rows = []
    for (task,), group in both.group_by("task", maintain_order=True):
        rows.append(
            {
                "task": task,
                "samples before": group["old"].is_not_null().sum(),
                "samples after": group["new"].is_not_null().sum(),
                "dropped": (group["old"].is_not_null() & group["new"].is_null()).sum(),
                "added": (group["old"].is_null() & group["new"].is_not_null()).sum(),
                "0→1": ((group["old"] == 0) & (group["new"] == 1)).sum(),
                "1→0": ((group["old"] == 1) & (group["new"] == 0)).sum(),
                "positives before": group["old"].sum(),
                "positives after": group["new"].sum(),
                "held-out positives before": group.filter(pl.col("split") == "held_out")["old"].sum(),
                "held-out positives after": group.filter(pl.col("split") == "held_out")["new"].sum(),
            }
        )
    table = pl.DataFrame(rows).sort("task")
    header = "| " + " | ".join(table.columns) + " |"
    print(header + "\n" + "|---" * len(table.columns) + "|")
    for row in table.iter_rows():
        print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
