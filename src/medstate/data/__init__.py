"""Clinical event data: MEDS datasets in (MIMIC-IV and FHIR readers to come), summaries."""

from medstate.data.meds import MEDS_SCHEMA, DatasetSummary, describe, scan_meds

__all__ = ["MEDS_SCHEMA", "DatasetSummary", "describe", "scan_meds"]
