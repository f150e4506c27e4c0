"""Small network blocks that several modalities' towers share."""

from __future__ import annotations

from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    """``Conv2d`` (no bias, "same" padding), ``BatchNorm2d``, ``ReLU``: ``N x cin x H x W -> N x cout x H/s x W/s``."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )
