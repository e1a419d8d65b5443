"""The U-Mamba-style net inside an unmodified nnU-Net v2.

nnU-Net builds its network from the plan: `get_network_from_plans` imports `network_arch_class_name` and calls it
with `input_channels`, `num_classes`, the plan's `arch_kwargs` (classes named in `arch_kwargs_req_import` already
imported) and `deep_supervision`; its trainer later sets `network.decoder.deep_supervision`. To use medstate's net,
copy a plan's configuration and set

    "network_arch_class_name": "medstate.vision.nnunet.UMambaNnUNet",
    "arch_kwargs": {...the planned n_stages, features_per_stage, conv_op, kernel_sizes, strides, n_conv_per_stage,
                    n_conv_per_stage_decoder, conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs,
                    nonlin, nonlin_kwargs..., "mamba_stages": [4, 5], "scan": "tri"}

nnU-Net then plans, preprocesses, trains its 5 folds and ensembles as usual. The planned convolution, norm and
nonlinearity classes must be ones the net has (Conv2d/Conv3d, instance or batch norm, LeakyReLU or ReLU); anything
else is refused by name rather than silently replaced."""

from __future__ import annotations

from torch import nn

from medstate.errors import MedstateError
from medstate.vision.blocks import MixerSpec
from medstate.vision.segmentation import SegmenterConfig, UMambaSegmenter

_NORMS = {
    nn.InstanceNorm2d: "instance",
    nn.InstanceNorm3d: "instance",
    nn.BatchNorm2d: "batch",
    nn.BatchNorm3d: "batch",
}
_NONLINS = {nn.LeakyReLU: "leakyrelu", nn.ReLU: "relu"}


def _name(table: dict, value, what: str) -> str:
    if value not in table:
        raise MedstateError(
            f"nnU-Net plan: {what} {getattr(value, '__name__', value)} is not supported by UMambaNnUNet"
        )
    return table[value]


class UMambaNnUNet(UMambaSegmenter):
    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        n_stages: int,
        features_per_stage,
        conv_op: type[nn.Module],
        kernel_sizes,
        strides,
        n_conv_per_stage,
        n_conv_per_stage_decoder,
        conv_bias: bool = False,
        norm_op: type[nn.Module] | None = None,
        norm_op_kwargs: dict | None = None,
        dropout_op: type[nn.Module] | None = None,
        dropout_op_kwargs: dict | None = None,
        nonlin: type[nn.Module] | None = None,
        nonlin_kwargs: dict | None = None,
        deep_supervision: bool = False,
        mamba_stages: list[int] | None = None,
        mamba_depth: int = 1,
        scan: str | None = None,
        mamba_version: int = 2,
        d_state: int = 16,
    ) -> None:
        dims = {nn.Conv2d: 2, nn.Conv3d: 3}.get(conv_op)
        if dims is None:
            raise MedstateError(f"nnU-Net plan: conv_op {getattr(conv_op, '__name__', conv_op)} is not Conv2d/Conv3d")
        if dropout_op is not None:
            raise MedstateError("nnU-Net plan: dropout_op is not supported by UMambaNnUNet (nnU-Net plans none)")

        def as_list(value):
            return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * n_stages

        per_stage = as_list(n_conv_per_stage)
        config = SegmenterConfig(
            num_classes=num_classes,
            in_channels=input_channels,
            spatial_dims=dims,
            features_per_stage=list(features_per_stage)[:n_stages],
            strides=[list(s) if isinstance(s, (list, tuple)) else s for s in strides],
            kernel_sizes=[list(k) if isinstance(k, (list, tuple)) else k for k in kernel_sizes],
            n_conv_per_stage=per_stage,
            n_conv_per_stage_decoder=as_list(n_conv_per_stage_decoder)[: n_stages - 1],
            norm=_name(_NORMS, norm_op or nn.InstanceNorm3d, "norm_op"),
            nonlin=_name(_NONLINS, nonlin or nn.LeakyReLU, "nonlin"),
            mamba_stages=list(mamba_stages) if mamba_stages is not None else [n_stages - 2, n_stages - 1],
            mamba_depth=mamba_depth,
            mixer=MixerSpec(version=mamba_version, d_state=d_state, scan=scan or ("tri" if dims == 3 else "cross")),
            deep_supervision=deep_supervision,
        )
        super().__init__(config)
