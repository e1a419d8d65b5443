"""`medstate data`: clinical event data in, validated MEDS out (`medstate.data`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import polars as pl
import typer

from medstate.cli.common import spinner, summary, table
from medstate.data import compare_meds, convert, describe
from medstate.loading import compile_pattern, parse_list

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.command("describe")
def data_describe(
    dataset: Annotated[Path, typer.Argument(help="MEDS dataset directory (data/ and metadata/)")],
    top: Annotated[int, typer.Option(min=1, help="code families to list")] = 10,
) -> None:
    """Subjects, events, time span, split sizes and the most frequent code families of a MEDS dataset."""
    found = describe(dataset, top=top)
    summary(
        str(dataset),
        {
            "subjects": found.subjects,
            "events": found.events,
            "time span": f"{found.first_time} → {found.last_time}",
            **{
                f"split {k or '(none)'}": f"{found.subjects_per_split[k]} subjects, {v} events"
                for k, v in sorted(found.events_per_split.items())
            },
        },
    )
    table("top code families", ["family", "events"], [[f, str(n)] for f, n in found.top_code_families])


@app.command("convert")
def data_convert(
    input: Annotated[Path, typer.Argument(help="MIMIC-IV root (hosp/, icu/), FHIR file or directory, or MEDS dataset")],
    output: Annotated[Path, typer.Argument(help="directory for the MEDS dataset (data/, metadata/, report.json)")],
    format: Annotated[str, typer.Option("--format", "-f", help="input format: mimic-iv, fhir or meds")],
    strict: Annotated[bool, typer.Option(help="stop at the first bad record instead of skipping and counting")] = False,
    shards: Annotated[
        int | None, typer.Option(min=1, help="subject shards per split (default: from the input size)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the subject-level train/tuning/held_out split")] = 0,
    split: Annotated[
        str, typer.Option(help="train,tuning,held_out fractions of subjects (kept from the input for MEDS)")
    ] = "0.8,0.1,0.1",
    tables: Annotated[
        str | None, typer.Option(help="MIMIC-IV only: comma-separated tables to read (default: all present)")
    ] = None,
    exclude_files: Annotated[
        list[str] | None, typer.Option(help="FHIR only: leave out files whose name matches this glob (repeatable)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace OUTPUT if medstate wrote it (never anything else)")] = False,
    workers: Annotated[
        int | None, typer.Option(min=0, help="processes sorting shards at the end (default ≤2; 0: less memory)")
    ] = None,
    timezone: Annotated[
        str, typer.Option(help="FHIR: the zone times are written in (offsets converted, naive times read as in it)")
    ] = "UTC",
) -> None:
    """Convert clinical data into a MEDS dataset; bad records are counted by reason in OUTPUT/report.json."""
    fractions = tuple(parse_list(split, float, "--split"))
    with spinner("reading") as say:
        read = [0]

        def progress(source: str, rows: int) -> None:
            read[0] += rows
            say(f"reading {source}: {read[0]:,} records")

        result = convert(
            input,
            output,
            format,
            strict=strict,
            shards=shards,
            seed=seed,
            split_fractions=fractions,
            tables=parse_list(tables, str, "--tables") if tables else None,
            exclude_files=exclude_files,
            overwrite=overwrite,
            workers=workers,
            timezone=timezone,
            progress=progress,
        )
    rows = []
    for name, counts in sorted(result.report.sources.items()):
        converted = "-" if counts.converted is None else f"{counts.converted:,}"  # not counted by this reader
        skipped, reduced = sum(counts.skipped.values()), sum(counts.coerced.values())
        rows.append([name, f"{counts.read:,}", converted, f"{result.report.ignored[name]:,}", f"{skipped:,}",
                     f"{counts.written:,}", f"{reduced:,}"])  # fmt: skip
    columns = ["source", "read", "converted", "ignored", "skipped", "events written", "values reduced"]
    table(f"{format} → {output}", columns, rows)
    done = result.summary
    summary(
        "summary",
        {
            "subjects": f"{done.subjects:,}",
            "events": f"{done.events:,}",
            "codes": f"{done.codes:,}",
            "splits": ", ".join(f"{k} {v}" for k, v in sorted(done.subjects_per_split.items())),
            "shards per split": done.shards,
            "records skipped": f"{result.report.total_skipped:,} (reasons in report.json)",
            "files lost": f"{len(result.report.lost_files)} (listed in report.json)",
            "report": str(done.output / "report.json"),
        },
    )


@app.command("compare")
def data_compare(
    candidate: Annotated[Path, typer.Argument(help="MEDS dataset to check")],
    reference: Annotated[Path, typer.Argument(help="reference MEDS dataset (e.g. the official MIMIC-IV MEDS)")],
    exclude_codes: Annotated[str | None, typer.Option(help="regular expression: codes left out on both sides")] = None,
) -> None:
    """Per code family: share of reference (subject, time, code) rows reproduced, extra rows, numeric agreement."""
    exclude = None
    if exclude_codes:
        exclude = pl.col("code").str.contains(compile_pattern(exclude_codes, "--exclude-codes").pattern)
    agreement = compare_meds(candidate, reference, exclude=exclude)
    rows = [
        [
            row["family"],
            f"{row['reference']:,}",
            f"{row['candidate']:,}",
            f"{row['matched']:,}",
            f"{row['recall']:.2%}" if row["reference"] else "-",
            f"{row['extra']:.2%}" if row["reference"] else "-",
            f"{row['numeric_agreement']:.2%}" if row["matched"] else "-",
        ]
        for row in agreement.table.iter_rows(named=True)
    ]
    columns = ["family", "reference", "candidate", "matched", "recall", "extra", "numeric equal"]
    table(f"{candidate} vs {reference} (reference subjects)", columns, rows)
