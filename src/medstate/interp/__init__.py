"""Attributions: integrated gradients from a task probability to each input event, and a timeline plot."""

from medstate.interp.attributions import Attribution, integrated_gradients, plot_timeline
from medstate.interp.explain import Explained, explain

__all__ = ["Attribution", "Explained", "explain", "integrated_gradients", "plot_timeline"]
