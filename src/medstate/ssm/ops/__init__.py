"""Kernels: pure functions of tensors, each with a `*_ref` twin (a naive recurrence) used by the tests."""

from medstate.ssm.ops.conv import causal_conv1d, causal_conv1d_ref, causal_conv1d_step
from medstate.ssm.ops.selective_scan import selective_scan, selective_scan_ref, selective_scan_step
from medstate.ssm.ops.ssd import ssd_scan, ssd_scan_ref, ssd_step

__all__ = [
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_step",
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_step",
    "ssd_scan",
    "ssd_scan_ref",
    "ssd_step",
]
