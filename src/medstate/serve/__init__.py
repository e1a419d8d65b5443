"""Serving: each patient's recurrent state updated event by event (`serve.patient`), exactly what re-encoding the
whole history gives."""

from medstate.serve.patient import PatientStream, ServedModel, predict_history

__all__ = ["PatientStream", "ServedModel", "predict_history"]
