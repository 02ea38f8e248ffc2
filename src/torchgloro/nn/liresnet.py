"""The LiResNet family (Hu et al., NeurIPS 2023; "Scaling in Depth", 2023) in the registry.

``create_model("liresnet", in_shape, num_classes, activation="minmax", depth=12, width=128)``
builds

* stem: a 3×3 convolution (``stem_stride=1``), or a ``s×s`` convolution with stride ``s``
  (patchify / space-to-depth, ``stem_stride=s``), then the activation;
* backbone: ``depth`` × (:class:`~torchgloro.nn.layers.LiResBlock` + activation);
* neck: a ``neck_stride×neck_stride`` convolution with that stride (skipped when
  ``neck_stride=1``), the activation, flatten, and (unless ``dense_width=0``) a dense layer
  and the activation;
* head: :class:`~torchgloro.nn.layers.LLNLinear` (``lln=True``, default) or ``nn.Linear``.

Every layer has a registered bound, so the result is accepted by :class:`GloroNet`. Strided
layers use TF-style SAME padding (an explicit ``nn.ZeroPad2d`` when it is asymmetric).
"""

from __future__ import annotations

import math

from torch import nn

from torchgloro._errors import GloroInputError
from torchgloro.nn.layers import LiResBlock, LLNLinear
from torchgloro.nn.models import ACTIVATIONS, register_model, same_padding

__all__ = ["liresnet"]


def _strided_conv(
    in_ch: int, out_ch: int, k: int, s: int, h: int, w: int
) -> tuple[list[nn.Module], int, int]:
    (pt, pb), (pl, pr) = same_padding(h, k, s), same_padding(w, k, s)
    if pt == pb and pl == pr:
        layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, k, s, padding=(pt, pl))]
    else:
        layers = [nn.ZeroPad2d((pl, pr, pt, pb)), nn.Conv2d(in_ch, out_ch, k, s)]
    return layers, math.ceil(h / s), math.ceil(w / s)


@register_model("liresnet")
def liresnet(
    in_shape: tuple[int, int, int],
    num_classes: int,
    activation: str = "minmax",
    depth: int = 12,
    width: int = 128,
    kernel_size: int = 3,
    residual_scale: float | None = None,
    affine: bool = False,
    stem_stride: int = 1,
    neck_stride: int = 4,
    neck_channels: int | None = None,
    dense_width: int = 512,
    lln: bool = True,
    lln_scale: float = 1.0,
) -> nn.Sequential:
    """Builds a LiResNet backbone (see the module docstring).

    Args:
        in_shape: ``(C, H, W)``.
        num_classes: Number of classes.
        activation: ``"minmax"`` (the paper's choice) or ``"relu"``.
        depth: Number of LiResBlocks.
        width: Channels of the stem and of every block.
        kernel_size: Odd kernel size of the blocks.
        residual_scale: α in ``x + α·conv(x)``; ``None`` means ``1/sqrt(depth)``.
        affine: Per-channel learnable scale in each block.
        stem_stride: 1 (3×3 stem) or the patch size of a strided stem.
        neck_stride: Stride (and kernel size) of the neck convolution; 1 skips it.
        neck_channels: Output channels of the neck convolution (default ``width``).
        dense_width: Width of the dense layer before the head; 0 skips it.
        lln: Last-layer normalization head (:class:`LLNLinear`) instead of ``nn.Linear``.
        lln_scale: The row norm of the LLN head.
    """
    for name, v, lo in (
        ("depth", depth, 0),
        ("width", width, 1),
        ("stem_stride", stem_stride, 1),
        ("neck_stride", neck_stride, 1),
        ("dense_width", dense_width, 0),
    ):
        if int(v) != v or v < lo:
            raise GloroInputError(f"liresnet: {name} must be an integer >= {lo}, got {v!r}.")
    act = ACTIVATIONS[activation]
    if residual_scale is None:
        residual_scale = 1.0 / math.sqrt(max(depth, 1))
    neck_channels = width if neck_channels is None else int(neck_channels)
    c, h, w = in_shape
    layers: list[nn.Module] = []

    if stem_stride == 1:
        layers.append(nn.Conv2d(c, width, 3, 1, padding=1))
    else:
        stem, h, w = _strided_conv(c, width, stem_stride, stem_stride, h, w)
        layers += stem
    layers.append(act())

    for _ in range(depth):
        layers += [LiResBlock(width, kernel_size, residual_scale, affine=affine), act()]

    ch = width
    if neck_stride > 1:
        neck, h, w = _strided_conv(width, neck_channels, neck_stride, neck_stride, h, w)
        layers += [*neck, act()]
        ch = neck_channels
    layers.append(nn.Flatten())
    features = ch * h * w
    if dense_width:
        layers += [nn.Linear(features, dense_width), act()]
        features = dense_width
    layers.append(
        LLNLinear(features, num_classes, scale=lln_scale)
        if lln
        else nn.Linear(features, num_classes)
    )
    return nn.Sequential(*layers)
