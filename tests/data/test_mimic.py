"""MIMIC-IV CSV → MEDS: a hand-worked example, and conformance with the official MIMIC-IV MEDS release."""

import gzip
from datetime import datetime

import polars as pl

from medstate.data.compare import compare_meds
from medstate.data.convert import convert
from medstate.data.meds import scan_meds

# ICU chartevents (itemid >= 220000) are LAB codes in the official release, but the demo CSV lacks chartevents
CHARTEVENTS = (pl.col("code").str.extract(r"^LAB//(\d+)//").cast(pl.Int64, strict=False) >= 220000).fill_null(False)


def write_csv(root, table, header, *rows, gz=True):
    path = root / f"{table}.csv.gz" if gz else root / f"{table}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join([header, *rows]) + "\n"
    if gz:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def tiny_mimic(root):
    """Two patients, one admission each; every convention the official ETL follows appears once."""
    write_csv(
        root,
        "hosp/patients",
        "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod",
        "1,F,60,2150,2011 - 2013,2151-03-04",
        "2,M,40,2120,2011 - 2013,",
    )
    write_csv(
        root,
        "hosp/admissions",
        "subject_id,hadm_id,admittime,dischtime,deathtime,admission_type,admit_provider_id,admission_location,"
        "discharge_location,insurance,language,marital_status,race,edregtime,edouttime,hospital_expire_flag",
        "1,11,2151-03-01 10:00:00,2151-03-04 12:00:00,2151-03-04 11:30:00,EW EMER.,P1,EMERGENCY ROOM,DIED,"
        "Medicare,ENGLISH,WIDOWED,WHITE,2151-03-01 08:00:00,2151-03-01 10:05:00,1",
        "2,22,2120-05-01 09:00:00,2120-05-03 15:00:00,,ELECTIVE,P2,PHYSICIAN REFERRAL,,Other,ENGLISH,,WHITE,,,0",
    )
    write_csv(
        root,
        "hosp/diagnoses_icd",
        "subject_id,hadm_id,seq_num,icd_code,icd_version",
        "1,11,1,4280,9",
        "2,22,1,I509,10",
    )
    write_csv(
        root,
        "hosp/drgcodes",
        "subject_id,hadm_id,drg_type,drg_code,description,drg_severity,drg_mortality",
        "1,11,HCFA,021,CRANIOTOMY,,",
    )
    write_csv(
        root,
        "hosp/labevents",
        "labevent_id,subject_id,hadm_id,specimen_id,itemid,order_provider_id,charttime,storetime,value,valuenum,"
        "valueuom,ref_range_lower,ref_range_upper,flag,priority,comments",
        "1,1,11,7,51214,,2151-03-02 06:00:00,,250,250,mg/dL,,,,ROUTINE,",
        "2,1,11,7,51498,,2151-03-02 06:00:00,,1.015,1.015, ,,,,STAT,",
        "3,2,,8,50800,,2120-04-30 07:00:00,,ART.,,,,,,,",
    )
    write_csv(
        root,
        "icu/icustays",
        "subject_id,hadm_id,stay_id,first_careunit,last_careunit,intime,outtime,los",
        "1,11,111,Medical Intensive Care Unit (MICU),Surgical ICU (SICU),2151-03-01 12:00:00,2151-03-03 12:00:00,2.0",
    )
    write_csv(
        root, "hosp/omr", "subject_id,chartdate,seq_num,result_name,result_value", "2,2120-04-01,1,BMI (kg/m2),27.5"
    )


def test_hand_worked_example(tmp_path):
    tiny_mimic(tmp_path / "mimic")
    result = convert(tmp_path / "mimic", tmp_path / "meds", "mimic-iv")
    events = scan_meds(tmp_path / "meds").collect()
    got = {
        (r["subject_id"], r["time"], r["code"], r["numeric_value"], r["text_value"])
        for r in events.iter_rows(named=True)
    }
    t = datetime
    expected = {
        (1, None, "GENDER//F", None, None),
        (1, t(2090, 1, 1), "MEDS_BIRTH", None, None),  # 1 January of anchor_year - anchor_age
        (1, t(2151, 3, 4, 11, 30), "MEDS_DEATH", None, None),  # in-hospital deathtime wins over dod
        (1, t(2151, 3, 1, 8), "ED_REGISTRATION", None, None),
        (1, t(2151, 3, 1, 10, 5), "ED_OUT", None, None),
        (1, t(2151, 3, 1, 10), "HOSPITAL_ADMISSION//EW EMER.//EMERGENCY ROOM", None, None),
        (1, t(2151, 3, 4, 12), "HOSPITAL_DISCHARGE//DIED", None, None),
        (1, t(2151, 3, 4, 12), "DIAGNOSIS//ICD//9//4280", None, None),  # dated at the admission's discharge
        (1, t(2151, 3, 4, 12), "DRG//HCFA//21//CRANIOTOMY", None, None),  # DRG codes are numbers: 021 → 21
        (1, t(2151, 3, 1, 12), "ICU_ADMISSION//Medical Intensive Care Unit (MICU)", None, None),  # first unit
        (1, t(2151, 3, 3, 12), "ICU_DISCHARGE//Surgical ICU (SICU)", None, None),  # last unit
        (1, t(2151, 3, 2, 6), "LAB//51214//mg/dL", 250.0, None),  # a text that repeats the number is dropped
        (1, t(2151, 3, 2, 6), "LAB//51498// ", 1.015, None),  # a blank unit stays verbatim, as officially
        (2, None, "GENDER//M", None, None),
        (2, t(2080, 1, 1), "MEDS_BIRTH", None, None),
        (2, t(2120, 5, 1, 9), "HOSPITAL_ADMISSION//ELECTIVE//PHYSICIAN REFERRAL", None, None),
        (2, t(2120, 5, 3, 15), "HOSPITAL_DISCHARGE//UNK", None, None),  # a missing part becomes UNK
        (2, t(2120, 5, 3, 15), "DIAGNOSIS//ICD//10//I509", None, None),
        (2, t(2120, 4, 30, 7), "LAB//50800//UNK", None, "ART."),
        (2, t(2120, 4, 1), "BMI (kg/m2)", None, "27.5"),
    }
    assert {(s, tm, c, None if v is None else round(v, 4), x) for s, tm, c, v, x in got} == expected
    # sorted by subject then time, static facts first; extra columns carried
    assert events["subject_id"].to_list() == sorted(events["subject_id"].to_list())
    first = events.filter(pl.col("subject_id") == 1)
    assert first["code"][0] == "GENDER//F" and first["time"].drop_nulls().is_sorted()
    admission = events.filter(pl.col("code").str.starts_with("HOSPITAL_ADMISSION//EW")).row(0, named=True)
    assert admission["hadm_id"] == 11 and admission["insurance"] == "Medicare"
    assert result.report.total_skipped == 0
    assert result.report.sources["labevents"].read == 3 and result.report.sources["labevents"].written == 3


def test_conformance_with_official_meds(mimic_csv_meds, shared_data):
    official = shared_data / "mimic-iv-demo-meds-0.0.1"
    agreement = compare_meds(mimic_csv_meds.summary.output, official, exclude=CHARTEVENTS)
    with pl.Config(tbl_rows=40, tbl_width_chars=160):
        print(agreement.table)
    total = agreement.total()
    assert total["reference"] == 27_559  # the 20 official subjects, without chartevents
    # pinned at the exactness reached: every official row and numeric value, in every family (a table dropped or
    # a code taken from the wrong column shows here)
    families = {row["family"]: row for row in agreement.table.iter_rows(named=True) if row["family"] != "ALL"}
    assert len(families) == 24
    for family, row in families.items():
        assert row["matched"] == row["numeric_equal"] == row["reference"], family
        # the only extra rows are prescriptions, which the official ETL does not read
        assert row["candidate"] == row["reference"] or family == "MEDICATION", family
    assert families["MEDICATION"]["candidate"] - families["MEDICATION"]["reference"] == 2_325


def test_dataset_layout_and_metadata(mimic_csv_meds, shared_data):
    root = mimic_csv_meds.summary.output
    assert (root / "report.json").is_file() and (root / "metadata" / "dataset.json").is_file()
    splits = pl.read_parquet(root / "metadata" / "subject_splits.parquet")
    assert splits.height == 100 and splits.group_by("split").len().sort("split")["len"].to_list() == [10, 80, 10]
    for shard in (root / "data").rglob("*.parquet"):
        frame = pl.read_parquet(shard)
        assert frame.select(pl.col("subject_id").is_sorted()).item()
        per_subject = frame.group_by("subject_id", maintain_order=True).agg(pl.col("time"))
        for times in per_subject["time"]:
            nulls = [t is None for t in times]
            assert nulls == sorted(nulls, reverse=True)  # static facts first
            assert [t for t in times if t is not None] == sorted(t for t in times if t is not None)
    codes = pl.read_parquet(root / "metadata" / "codes.parquet")
    described = dict(zip(codes["code"], codes["description"]))
    parents = dict(zip(codes["code"], codes["parent_codes"]))
    assert described["DIAGNOSIS//ICD//9//4280"] == "Congestive heart failure, unspecified"
    assert parents["DIAGNOSIS//ICD//9//4280"].to_list() == ["ICD9CM/428.0"]
    # parent codes agree with the official metadata where both have them
    official = pl.read_parquet(shared_data / "mimic-iv-demo-meds-0.0.1" / "metadata" / "codes.parquet")
    icd = official.filter(pl.col("code").str.contains("//ICD//")).join(codes, on="code", suffix="_ours")
    assert icd.height > 1000
    assert (icd["parent_codes"] == icd["parent_codes_ours"]).all()
    assert sum(codes["count"]) == mimic_csv_meds.summary.events
