"""AdaptSegNet's fully convolutional output-space discriminator."""

from __future__ import annotations

import torch
from torch import nn

# Five 4x4 stride-2 convs with padding 1 halve a side five times: maps narrower than
# 32 pixels leave the classifier nothing to convolve.
MIN_SIDE = 32


class FCDiscriminator(nn.Module):
    """Five 4x4 stride-2 convs (C -> ndf -> 2ndf -> 4ndf -> 8ndf -> 1), LeakyReLU(0.2) between.

    ``num_classes`` is the input channel count: softmax maps or ADVENT's entropy-weighted
    maps both have one channel per class. Module names follow AdaptSegNet, so its
    discriminator checkpoints load. Output: one logit per 32x32 input patch.
    """

    def __init__(self, num_classes: int, ndf: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_classes, ndf, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(ndf, ndf * 2, 4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(ndf * 2, ndf * 4, 4, stride=2, padding=1)
        self.conv4 = nn.Conv2d(ndf * 4, ndf * 8, 4, stride=2, padding=1)
        self.classifier = nn.Conv2d(ndf * 8, 1, 4, stride=2, padding=1)
        self.leaky_relu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < MIN_SIDE:
            raise ValueError(
                f"the discriminator needs maps of at least {MIN_SIDE}x{MIN_SIDE} pixels, "
                f"got {x.shape[-2]}x{x.shape[-1]}"
            )
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = self.leaky_relu(conv(x))
        return self.classifier(x)
