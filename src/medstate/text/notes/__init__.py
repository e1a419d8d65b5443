"""ClinicalMamba's recipe: a patient's longitudinal notes as documents (`documents`: MEDS, MIMIC-III, MIMIC-IV-Note,
n2c2 2018), labelled cohorts from structured data (`cohort`) and ICD-style coding labels (`coding`), their seeded
patient splits (`splits`), prompt-based multi-label classification with state branching (`classify`) and its
training and evaluation run (`classify_run`); `export` is what `medstate text notes` does.

May import: the text core (medstate.text.*, not its other recipes) and what the core may import.
"""
