"""Clinical event data: MIMIC-IV CSV, FHIR R4 and MEDS in; validated MEDS datasets out."""

from medstate.data.compare import compare_meds
from medstate.data.convert import convert
from medstate.data.meds import MEDS_SCHEMA, DatasetSummary, describe, scan_meds
from medstate.data.report import ConversionReport

__all__ = ["MEDS_SCHEMA", "ConversionReport", "DatasetSummary", "compare_meds", "convert", "describe", "scan_meds"]
