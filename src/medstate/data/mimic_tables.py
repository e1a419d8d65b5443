"""MIMIC-IV v2.x tables described as data (`TABLES`): which events a row yields, how each event's code is assembled
from literal parts and columns (`$column`; a missing part becomes `UNK`), which column gives its time, value and extra
columns; the admissions lookup some tables need; and the times MIMIC-IV writes (`parse_times`). `data.mimic` reads
the tables by these descriptions."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

import polars as pl

MISSING_PART = "UNK"
TIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d")

EXTRA_COLUMNS: dict[str, pl.DataType] = {
    "hadm_id": pl.Int64,
    "icustay_id": pl.Int64,
    "unit": pl.String,
    "priority": pl.String,
    "insurance": pl.String,
    "language": pl.String,
    "marital_status": pl.String,
    "race": pl.String,
    "hospital_expire_flag": pl.Int64,
    "drg_severity": pl.Int64,
    "drg_mortality": pl.Int64,
    "emar_id": pl.String,
    "emar_seq": pl.Int64,
    "route": pl.String,
    "frequency": pl.String,
    "doses_per_24_hrs": pl.Float64,
    "poe_id": pl.String,
    "order_id": pl.Int64,
    "link_order_id": pl.Int64,
    "ordercategorydescription": pl.String,
    "statusdescription": pl.String,
}


@dataclass(frozen=True)
class EventSpec:
    """One event per row: `code` parts are literals or `$column`; `time` names a column (None: a static fact)."""

    code: tuple[str, ...]
    time: str | None
    numeric: str | None = None
    text: str | None = None
    extras: dict[str, str] = field(default_factory=dict)  # output column -> source column
    optional: bool = False  # a row without this event's time simply has no such event (e.g. no ED stay)

    def columns(self) -> set[str]:
        parts = {p[1:] for p in self.code if p.startswith("$")}
        return parts | {c for c in (self.time, self.numeric, self.text) if c} | set(self.extras.values())


@dataclass(frozen=True)
class TableSpec:
    path: str  # relative to the MIMIC-IV root, without .csv/.csv.gz
    events: tuple[EventSpec, ...]
    # columns added from admissions (joined on hadm_id) or computed before the events are cut
    derive: Callable[[pl.DataFrame, Admissions], pl.DataFrame] | None = None
    derived_columns: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return self.path.split("/")[-1]

    def source_columns(self) -> list[str]:
        needed = set().union(*(e.columns() for e in self.events)) - self.derived_columns
        return sorted(needed | {"subject_id"} | _DERIVE_INPUTS.get(self.path, set()))


class Admissions:
    """hadm_id → discharge time and subject → in-hospital death time, for other tables (one row per stay)."""

    def __init__(self, frame: pl.DataFrame):
        self.discharge = frame.select(
            pl.col("hadm_id").cast(pl.Int64, strict=False),
            parse_times(frame["dischtime"]).alias("hadm_discharge_time"),
        ).drop_nulls("hadm_id")
        self.death = (
            frame.select(
                pl.col("subject_id").cast(pl.Int64, strict=False), parse_times(frame["deathtime"]).alias("deathtime")
            )
            .drop_nulls()
            .group_by("subject_id")
            .agg(pl.col("deathtime").max())
        )


def _with_discharge_time(frame: pl.DataFrame, admissions: Admissions) -> pl.DataFrame:
    frame = frame.with_columns(pl.col("hadm_id").cast(pl.Int64, strict=False).alias("_hadm"))
    joined = frame.join(
        admissions.discharge.rename({"hadm_id": "_hadm"}), on="_hadm", how="left", maintain_order="left"
    )
    return joined.drop("_hadm").with_columns(pl.col("hadm_discharge_time").dt.strftime("%Y-%m-%d %H:%M:%S"))


def _drg(frame: pl.DataFrame, admissions: Admissions) -> pl.DataFrame:
    """DRG codes are numbers in the official ETL ("021" → "21"); non-numeric codes stay as they are."""
    number = pl.col("drg_code").str.strip_chars().cast(pl.Int64, strict=False).cast(pl.String)
    return _with_discharge_time(
        frame.with_columns(pl.coalesce(number, pl.col("drg_code")).alias("drg_code")), admissions
    )


def _birth_and_death(frame: pl.DataFrame, admissions: Admissions) -> pl.DataFrame:
    """Birth: 1 January of anchor_year − anchor_age. Death: the in-hospital deathtime if any, else dod."""
    birth_year = pl.col("anchor_year").cast(pl.Int64, strict=False) - pl.col("anchor_age").cast(pl.Int64, strict=False)
    frame = frame.with_columns(
        pl.col("subject_id").cast(pl.Int64, strict=False).alias("_subject"),
        pl.format("{}-01-01", birth_year.cast(pl.String).str.zfill(4)).alias("year_of_birth"),
    )
    death = admissions.death.rename({"subject_id": "_subject"})
    frame = frame.join(death, on="_subject", how="left", maintain_order="left")
    death_time = pl.coalesce(pl.col("deathtime").dt.strftime("%Y-%m-%d %H:%M:%S"), pl.col("dod"))
    return frame.with_columns(death_time.alias("death_time")).drop("_subject", "deathtime")


_DERIVE_INPUTS = {
    "hosp/patients": {"anchor_year", "anchor_age", "dod"},
    "hosp/diagnoses_icd": {"hadm_id"},
    "hosp/drgcodes": {"hadm_id"},
}


def _event(code, time, **kwargs) -> EventSpec:
    return EventSpec(code=tuple(code), time=time, **kwargs)


_HADM = {"hadm_id": "hadm_id"}
_STAY = {"hadm_id": "hadm_id", "icustay_id": "stay_id"}

TABLES: tuple[TableSpec, ...] = (
    TableSpec(
        "hosp/patients",
        (
            _event(["GENDER", "$gender"], None),
            _event(["MEDS_BIRTH"], "year_of_birth"),
            _event(["MEDS_DEATH"], "death_time", optional=True),
        ),
        derive=_birth_and_death,
        derived_columns=frozenset({"year_of_birth", "death_time"}),
    ),
    TableSpec(
        "hosp/admissions",
        (
            _event(["ED_REGISTRATION"], "edregtime", extras=_HADM, optional=True),
            _event(["ED_OUT"], "edouttime", extras=_HADM, optional=True),
            _event(
                ["HOSPITAL_ADMISSION", "$admission_type", "$admission_location"],
                "admittime",
                extras={**_HADM, **{c: c for c in ("insurance", "language", "marital_status", "race")}},
            ),
            _event(
                ["HOSPITAL_DISCHARGE", "$discharge_location"],
                "dischtime",
                extras={**_HADM, "hospital_expire_flag": "hospital_expire_flag"},
            ),
        ),
    ),
    TableSpec(
        "hosp/diagnoses_icd",
        (_event(["DIAGNOSIS", "ICD", "$icd_version", "$icd_code"], "hadm_discharge_time", extras=_HADM),),
        derive=_with_discharge_time,
        derived_columns=frozenset({"hadm_discharge_time"}),
    ),
    TableSpec(
        "hosp/drgcodes",
        (
            _event(
                ["DRG", "$drg_type", "$drg_code", "$description"],
                "hadm_discharge_time",
                extras={**_HADM, "drg_severity": "drg_severity", "drg_mortality": "drg_mortality"},
            ),
        ),
        derive=_drg,
        derived_columns=frozenset({"hadm_discharge_time"}),
    ),
    TableSpec("hosp/transfers", (_event(["TRANSFER_TO", "$eventtype", "$careunit"], "intime", extras=_HADM),)),
    TableSpec(
        "hosp/procedures_icd", (_event(["PROCEDURE", "ICD", "$icd_version", "$icd_code"], "chartdate", extras=_HADM),)
    ),
    TableSpec("hosp/hcpcsevents", (_event(["HCPCS", "$short_description"], "chartdate", extras=_HADM),)),
    TableSpec(
        "hosp/labevents",
        (
            _event(
                ["LAB", "$itemid", "$valueuom"],
                "charttime",
                numeric="valuenum",
                text="value",
                extras={**_HADM, "priority": "priority"},
            ),
        ),
    ),
    TableSpec("hosp/omr", (_event(["$result_name"], "chartdate", text="result_value"),)),
    TableSpec(
        "hosp/emar",
        (
            _event(
                ["MEDICATION", "$medication", "$event_txt"],
                "charttime",
                extras={**_HADM, "emar_id": "emar_id", "emar_seq": "emar_seq"},
            ),
        ),
    ),
    TableSpec(
        "hosp/pharmacy",
        (
            _event(
                ["MEDICATION", "START", "$medication"],
                "starttime",
                extras={
                    **_HADM,
                    **{c: c for c in ("route", "frequency", "doses_per_24_hrs", "poe_id")},
                },
            ),
            _event(
                ["MEDICATION", "STOP", "$medication"], "stoptime", extras={**_HADM, "poe_id": "poe_id"}, optional=True
            ),
        ),
    ),
    TableSpec(
        "hosp/prescriptions",
        (
            _event(
                ["MEDICATION", "PRESCRIPTION", "$drug"],
                "starttime",
                numeric="dose_val_rx",
                extras={**_HADM, "unit": "dose_unit_rx", "route": "route", "poe_id": "poe_id"},
            ),
        ),
    ),
    TableSpec(
        "icu/icustays",
        (
            _event(["ICU_ADMISSION", "$first_careunit"], "intime", extras=_STAY),
            _event(["ICU_DISCHARGE", "$last_careunit"], "outtime", extras=_STAY, optional=True),
        ),
    ),
    TableSpec(
        "icu/inputevents",
        (
            _event(
                ["INFUSION_START", "$itemid"],
                "starttime",
                numeric="rate",
                extras={
                    **_STAY,
                    "unit": "rateuom",
                    "order_id": "orderid",
                    "link_order_id": "linkorderid",
                    "ordercategorydescription": "ordercategorydescription",
                    "statusdescription": "statusdescription",
                },
            ),
            _event(
                ["INFUSION_END", "$itemid"],
                "endtime",
                numeric="amount",
                extras={
                    **_STAY,
                    "unit": "amountuom",
                    "order_id": "orderid",
                    "link_order_id": "linkorderid",
                    "ordercategorydescription": "ordercategorydescription",
                    "statusdescription": "statusdescription",
                },
                optional=True,
            ),
            _event(["SUBJECT_WEIGHT_AT_INFUSION", "KG"], "starttime", numeric="patientweight", extras=_STAY),
        ),
    ),
    TableSpec(
        "icu/outputevents",
        (_event(["SUBJECT_FLUID_OUTPUT", "$itemid", "$valueuom"], "charttime", numeric="value", extras=_STAY),),
    ),
    TableSpec(
        "icu/procedureevents",
        (
            _event(["PROCEDURE", "START", "$itemid"], "starttime", extras=_STAY),
            _event(["PROCEDURE", "END", "$itemid"], "endtime", extras=_STAY, optional=True),
        ),
    ),
    TableSpec(
        "icu/chartevents",
        (
            _event(
                ["LAB", "$itemid", "$valueuom"],
                "charttime",
                numeric="valuenum",
                text="value",
                extras=_STAY,
            ),
        ),
    ),
)
TABLE_NAMES = tuple(t.name for t in TABLES)


def parse_times(values: pl.Series) -> pl.Series:
    """Strings → datetime[us] (null where empty or unparseable). The format of the first value is tried on all
    rows; only rows it fails on try the other formats."""
    first = values.drop_nulls().head(1)
    if first.is_empty():
        return pl.Series(values.name, [None] * len(values), dtype=pl.Datetime("us"))
    formats = sorted(TIME_FORMATS, key=lambda fmt: len(dt.datetime(2000, 1, 1).strftime(fmt)) != len(first[0]))
    parsed = values.str.strptime(pl.Datetime("us"), formats[0], strict=False)
    failed = (parsed.is_null() & values.is_not_null()).arg_true()
    if len(failed):
        rest = values.gather(failed).str.strip_chars()
        retried = pl.select(pl.coalesce(*(rest.str.strptime(pl.Datetime("us"), f, strict=False) for f in formats)))
        parsed = parsed.scatter(failed, retried.to_series())
    return parsed
