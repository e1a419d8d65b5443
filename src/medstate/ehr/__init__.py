"""EhrMamba: patient sequences from MEDS events, task labels, the model and its baselines."""

from medstate.ehr.sequences import PatientSequence, ValueBins, build_sequence, interval_token
from medstate.ehr.vocab import Vocabulary

__all__ = ["PatientSequence", "ValueBins", "Vocabulary", "build_sequence", "interval_token"]
