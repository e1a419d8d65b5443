"""Attributions: integrated gradients from a task probability to each input event, and a timeline plot."""

from medstate.interp.attributions import Attribution, integrated_gradients, plot_timeline

__all__ = ["Attribution", "integrated_gradients", "plot_timeline"]
