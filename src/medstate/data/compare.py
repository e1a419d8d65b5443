"""Agreement between two MEDS datasets, per code family: how many reference (subject_id, time, code) rows the
candidate reproduces, how many it adds, and whether numeric values agree on the rows that match.

Rows are compared as multisets: a key that occurs twice in the reference and once in the candidate counts one match.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from medstate.data.meds import scan_meds

KEY = ["subject_id", "time", "code"]


@dataclass
class Agreement:
    table: pl.DataFrame  # one row per family, plus "ALL"

    def total(self) -> dict:
        return self.table.filter(pl.col("family") == "ALL").row(0, named=True)


def family_of(code: pl.Expr) -> pl.Expr:
    return code.str.split("//").list.first()


def compare_meds(
    candidate: str | Path | pl.LazyFrame,
    reference: str | Path | pl.LazyFrame,
    subjects: str = "reference",
    exclude: pl.Expr | None = None,
) -> Agreement:
    """Per-family recall of the reference rows, extra candidate rows, and numeric agreement on matched rows.

    `subjects="reference"` restricts the candidate to the subjects the reference has (e.g. a partial official
    release); `exclude` is a filter on `code` for rows to leave out of both sides."""
    cand = candidate if isinstance(candidate, pl.LazyFrame) else scan_meds(candidate)
    ref = reference if isinstance(reference, pl.LazyFrame) else scan_meds(reference)
    cand, ref = (f.select(*KEY, "numeric_value") for f in (cand, ref))
    if subjects == "reference":
        cand = cand.join(ref.select("subject_id").unique(), on="subject_id", how="semi")
    if exclude is not None:
        cand, ref = cand.filter(~exclude), ref.filter(~exclude)
    # values agree to 5 significant digits (float32 round trips); a missing value matches only a missing value
    value = pl.col("numeric_value").cast(pl.Float64).round_sig_figs(5).cast(pl.String).fill_null("null").alias("value")

    def counts(frame: pl.LazyFrame, keys: list, name: str) -> pl.LazyFrame:
        return frame.group_by(keys).agg(pl.len().alias(name))

    by_key = counts(ref, KEY, "n_ref").join(
        counts(cand, KEY, "n_cand"), on=KEY, how="full", coalesce=True, nulls_equal=True
    )
    by_key = by_key.with_columns(pl.col("n_ref").fill_null(0), pl.col("n_cand").fill_null(0))
    by_value = counts(ref.with_columns(value), [*KEY, "value"], "n_ref").join(
        counts(cand.with_columns(value), [*KEY, "value"], "n_cand"), on=[*KEY, "value"], how="inner", nulls_equal=True
    )
    rows = by_key.group_by(family_of(pl.col("code")).alias("family")).agg(
        pl.col("n_ref").sum().alias("reference"),
        pl.col("n_cand").sum().alias("candidate"),
        pl.min_horizontal("n_ref", "n_cand").sum().alias("matched"),
    )
    equal = by_value.group_by(family_of(pl.col("code")).alias("family")).agg(
        pl.min_horizontal("n_ref", "n_cand").sum().alias("numeric_equal")
    )
    table = rows.join(equal, on="family", how="left").with_columns(pl.col("numeric_equal").fill_null(0)).collect()
    total = table.select(pl.lit("ALL").alias("family"), pl.exclude("family").sum())
    table = pl.concat([table.sort("reference", descending=True), total])
    table = table.with_columns(
        (pl.col("matched") / pl.col("reference")).alias("recall"),
        ((pl.col("candidate") - pl.col("matched")) / pl.col("reference")).alias("extra"),
        (pl.col("numeric_equal") / pl.col("matched")).alias("numeric_agreement"),
    )
    return Agreement(table=table)
